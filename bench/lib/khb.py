#!/usr/bin/env python3
"""Helpers for bench/run: templates, upload bodies, correctness checks, records, report.

  khb.py render TEMPLATE OUT KEY=VALUE...       replace @KEY@ in TEMPLATE, write OUT
  khb.py mkbody DIR MIB PLACEHOLDER REAL        DIR/body-plain.bin (random, no placeholder),
                                                DIR/body-inject.bin (a placeholder every MiB),
                                                DIR/body-inject-real.bin (the same with the
                                                real value: what "direct" sends)
  khb.py auth-check LOG REAL PLACEHOLDER        nginx upstream log (one Authorization per line)
  khb.py add-wrk RAW CONTENDER WORKLOAD ROUND CHECKJSON  < wrk output
  khb.py add-upload RAW CONTENDER WORKLOAD ROUND LOG OFFSET CURLOUT RSSKIB EXPECTJSON
  khb.py add-download RAW CONTENDER WORKLOAD ROUND FILE CURLOUT RSSKIB BYTES REAL PLACEHOLDER [CPU]
  khb.py add-na RAW CONTENDER WORKLOAD REASON
  khb.py report RAW META OUT.md OUT.png         medians, ratios, table, chart
"""
import json
import os
import re
import statistics
import sys

CONTENDERS = ["direct", "nginx", "keyhole", "mitmproxy", "squid"]
LABELS = {
    "direct": "direct (no proxy)",
    "nginx": "nginx reverse proxy",
    "keyhole": "Keyhole (transparent)",
    "mitmproxy": "mitmproxy (transparent)",
    "squid": "Squid ssl-bump (intercept)",
}


def render(template, out, pairs):
    text = open(template).read()
    for pair in pairs:
        k, _, v = pair.partition("=")
        text = text.replace("@" + k + "@", v)
    if "@" in text:
        import re
        left = sorted(set(re.findall(r"@[A-Z_]+@", text)))
        if left:
            sys.exit(f"render: {template}: unreplaced {left}")
    with open(out, "w") as f:
        f.write(text)


def mkbody(directory, mib, placeholder, real):
    mib = int(mib)
    p, r = placeholder.encode(), real.encode()
    with open(os.path.join(directory, "body-plain.bin"), "wb") as plain, \
         open(os.path.join(directory, "body-inject.bin"), "wb") as inject, \
         open(os.path.join(directory, "body-inject-real.bin"), "wb") as injreal:
        for _ in range(mib):
            block = os.urandom(1 << 20)
            # random bytes could (astronomically unlikely) contain either value: refuse them
            assert p not in block and r not in block
            plain.write(block)
            # the placeholder as a whole token (a letter, digit or "_" right after it would
            # make it a different token, which Keyhole rightly leaves alone)
            at, token = 4096, b" " + p + b" "
            inject.write(block[:at] + token + block[at + len(token):])
            injreal.write(block[:at] + b" " + r + b" " + block[at + len(token):])
    print(json.dumps({"mib": mib, "placeholders": mib}))


def auth_check(log, real, placeholder):
    want = "Bearer " + real
    lines = real_n = ph = other = 0
    with open(log, "rb") as f:
        for raw in f:
            line = raw.rstrip(b"\n").decode("latin-1")
            lines += 1
            if placeholder in line:
                ph += 1
            elif line == want:
                real_n += 1
            else:
                other += 1
    ok = real_n > 0 and ph == 0 and other == 0
    return {"upstream_requests": lines, "real": real_n, "placeholder": ph, "other": other, "ok": ok}


def append(raw, record):
    with open(raw, "a") as f:
        f.write(json.dumps(record) + "\n")


def cpu_value(text):
    try:
        return float(text)
    except ValueError:
        return None


def add_wrk(raw, contender, workload, rnd, check_json, cpu_s="-"):
    out = sys.stdin.read()
    rec = {"contender": contender, "workload": workload, "round": int(rnd), "proxy_cpu_s": cpu_value(cpu_s)}
    line = next((l for l in out.splitlines() if l.startswith("KHBJSON ")), None)
    check = json.loads(check_json) if check_json else {"ok": False, "why": "no check"}
    rec["check"] = check
    if line is None:
        rec["error"] = "wrk produced no result: " + out[-400:]
    else:
        w = json.loads(line[len("KHBJSON "):])
        rec.update(w)
        secs = w["duration_us"] / 1e6
        rec["rate"] = w["requests"] / secs if secs > 0 else 0.0
        rec["errors"] = sum(w[k] for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout"))
        if rec["proxy_cpu_s"] is not None and secs > 0:
            rec["proxy_cpu_pct"] = rec["proxy_cpu_s"] / secs * 100
            if w["requests"]:
                rec["proxy_cpu_us_per_req"] = rec["proxy_cpu_s"] / w["requests"] * 1e6
        # wrk counts a request whose response never came as a read/timeout error; the
        # upstream must have seen at least the completed requests.
    append(raw, rec)
    status = "ok" if check.get("ok") else "CHECK FAILED"
    if "rate" in rec:
        print(f"  {workload:6} {contender:10} round {rnd}: {rec['rate']:10.0f}/s  p50 {rec['p50_us']/1000:.2f} ms"
              f"  p99 {rec['p99_us']/1000:.2f} ms  errors {rec['errors']}  check {status}"
              f" ({check.get('real', '?')} real, {check.get('placeholder', '?')} placeholder,"
              f" {check.get('other', '?')} other)"
              + (f"  proxy CPU {rec['proxy_cpu_pct']:.0f}% ({rec.get('proxy_cpu_us_per_req', 0):.0f} µs/req)" if "proxy_cpu_pct" in rec else ""))
    else:
        print(f"  {workload:6} {contender:10} round {rnd}: FAILED: {rec['error'][:200]}")


def add_h2load(raw, contender, workload, rnd, check_json, cpu_s="-", duration="0"):
    """h2load's summary: 'finished in 6.00s, 1234.5 req/s, ...', 'requests: N total, N started,
    N done, N succeeded, N failed, N errored, N timeout', 'time for request: min max mean sd'."""
    out = sys.stdin.read()
    rec = {"contender": contender, "workload": workload, "round": int(rnd), "proxy_cpu_s": cpu_value(cpu_s)}
    check = json.loads(check_json) if check_json else {"ok": False, "why": "no check"}
    rec["check"] = check
    finished = re.search(r"finished in ([0-9.]+)s, ([0-9.]+) req/s", out)
    requests = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    timing = re.search(r"time for request:\s+([0-9.]+)(us|ms|s)\s+([0-9.]+)(us|ms|s)\s+([0-9.]+)(us|ms|s)", out)
    if not finished or not requests:
        rec["error"] = "h2load produced no result: " + out[-400:]
    else:
        secs = float(finished.group(1))
        succeeded = int(requests.group(4))
        rec["requests"] = succeeded
        rec["rate"] = succeeded / secs if secs > 0 else 0.0
        rec["errors"] = int(requests.group(5)) + int(requests.group(6))
        if timing:
            scale = {"us": 1, "ms": 1000, "s": 1e6}
            rec["mean_us"] = float(timing.group(5)) * scale[timing.group(6)]
            rec["max_us"] = float(timing.group(3)) * scale[timing.group(4)]
        if rec["proxy_cpu_s"] is not None and secs > 0:
            rec["proxy_cpu_pct"] = rec["proxy_cpu_s"] / secs * 100
            if succeeded:
                rec["proxy_cpu_us_per_req"] = rec["proxy_cpu_s"] / succeeded * 1e6
    append(raw, rec)
    status = "ok" if check.get("ok") else "CHECK FAILED"
    if "rate" in rec:
        print(f"  {workload:6} {contender:10} round {rnd}: {rec['rate']:10.0f}/s  mean {rec.get('mean_us', 0)/1000:.2f} ms"
              f"  errors {rec['errors']}  check {status}"
              + (f"  proxy CPU {rec['proxy_cpu_pct']:.0f}% ({rec.get('proxy_cpu_us_per_req', 0):.0f} µs/req)" if "proxy_cpu_pct" in rec else ""))
    else:
        print(f"  {workload:6} {contender:10} round {rnd}: FAILED: {rec['error'][:200]}")


def add_upload(raw, contender, workload, rnd, log, offset, curl_out, rss_kib, expect_json, cpu_s="-"):
    expect = json.loads(expect_json)
    rec = {"contender": contender, "workload": workload, "round": int(rnd), "proxy_cpu_s": cpu_value(cpu_s)}
    parts = curl_out.split()
    records = []
    with open(log, "rb") as f:
        f.seek(int(offset))
        for line in f.read().decode().splitlines():
            if line.strip():
                records.append(json.loads(line))
    why = []
    if len(parts) < 3 or parts[0] != "200":
        why.append(f"curl: {curl_out.strip()[:200]!r}")
    if len(records) != 1:
        why.append(f"upstream saw {len(records)} requests")
    for r in records:
        if r.get("auth") != "Bearer " + expect["real_value"]:
            why.append("Authorization at upstream is " + ("the placeholder" if r.get("auth") and "$MSB_TOKEN" in r["auth"] else repr((r.get("auth") or "")[:12] + "…")))
        if r.get("body_length") != expect["body_length"]:
            why.append(f"body_length {r.get('body_length')} != {expect['body_length']}")
        if r.get("placeholder") != 0:
            why.append(f"{r.get('placeholder')} placeholders in the body at upstream")
        if r.get("real") != expect["real"]:
            why.append(f"{r.get('real')} real values in the body at upstream, expected {expect['real']}")
    rec["check"] = {"ok": not why, "why": why, "upstream": records}
    record_transfer(raw, rec, parts, curl_out, expect["mib"], rss_kib, why)


def record_transfer(raw, rec, parts, curl_out, mib, rss_kib, why, extra=""):
    """The common end of an upload or download record: throughput and CPU per GiB from curl's
    `CODE SECONDS SIZE`, the peak RSS, the record appended, a line printed."""
    workload, contender, rnd = rec["workload"], rec["contender"], rec["round"]
    if len(parts) >= 3 and parts[0] == "200":
        secs = float(parts[1])
        rec["seconds"] = secs
        rec["mib_s"] = mib / secs if secs > 0 else 0.0
        if rec["proxy_cpu_s"] is not None:
            rec["proxy_cpu_s_per_gib"] = rec["proxy_cpu_s"] / (mib / 1024)
    else:
        rec["error"] = curl_out.strip()[:300] or "curl failed"
    rec["rss_kib"] = int(rss_kib) if rss_kib.isdigit() else None
    append(raw, rec)
    status = "ok" if not why else "CHECK FAILED: " + "; ".join(why)
    rss = f"{int(rss_kib)/1024:.0f} MiB" if rss_kib.isdigit() else "-"
    if "mib_s" in rec:
        cpu = f"  proxy CPU {rec['proxy_cpu_s']:.2f} s" if rec["proxy_cpu_s"] is not None else ""
        print(f"  {workload:6} {contender:10} round {rnd}: {rec['mib_s']:8.1f} MiB/s  {rec['seconds']:6.2f} s  peak RSS {rss}{cpu}{extra}  check {status}")
    else:
        print(f"  {workload:6} {contender:10} round {rnd}: FAILED ({rec['error'][:200]})  check {status}")


def count_in_file(path, needle):
    """Occurrences of needle in the file, read in 1 MiB blocks (occurrences across blocks count)."""
    n, tail, keep = 0, b"", len(needle) - 1
    try:
        with open(path, "rb") as f:
            while True:
                block = f.read(1 << 20)
                if not block:
                    break
                joined = tail + block
                n += joined.count(needle)
                tail = joined[-keep:] if keep else b""  # shorter than the needle: counted once
    except FileNotFoundError:
        return None
    return n


def add_download(raw, contender, workload, rnd, path, curl_out, rss_kib, size, real, placeholder, cpu_s="-"):
    size = int(size)
    mib = size / (1 << 20)
    rec = {"contender": contender, "workload": workload, "round": int(rnd), "proxy_cpu_s": cpu_value(cpu_s)}
    parts = curl_out.split()
    real_n = count_in_file(path, real.encode())
    masked_n = count_in_file(path, placeholder.encode())
    why = []
    if len(parts) < 3 or parts[0] != "200":
        why.append(f"curl: {curl_out.strip()[:200]!r}")
    elif int(float(parts[2])) != size:
        why.append(f"downloaded {parts[2]} bytes, expected {size}")
    if contender == "keyhole" and real_n:
        why.append(f"the guest received the real value {real_n} times")
    rec["check"] = {"ok": not why, "why": why, "real_at_guest": real_n, "masked_at_guest": masked_n}
    record_transfer(raw, rec, parts, curl_out, mib, rss_kib, why, extra=f"  real values at the guest {real_n}, masked {masked_n}")


def add_idle(raw, contender, workload, rnd, out):
    """(h): the JSON line idle_conns.py printed."""
    rec = {"contender": contender, "workload": workload, "round": int(rnd)}
    try:
        result = json.loads(out.strip().splitlines()[-1])
        rec.update(result)
        rec["check"] = {"ok": result.get("failed", 1) == 0 and result.get("probe_errors", 1) == 0,
                        "why": f"{result.get('failed')} connections failed, {result.get('probe_errors')} probe errors"}
        if result.get("kib_per_connection") is not None:
            rec["kib_per_connection"] = result["kib_per_connection"]
    except (ValueError, IndexError):
        rec["error"] = "idle_conns.py produced no result: " + out[-400:]
        rec["check"] = {"ok": False, "why": "no result"}
    append(raw, rec)
    if "error" in rec:
        print(f"  {workload:6} {contender:10} round {rnd}: FAILED: {rec['error'][:200]}")
    else:
        print(f"  {workload:6} {contender:10} round {rnd}: {rec['open']} open, {rec.get('kib_per_connection')} KiB each, "
              f"p99 {rec.get('p99_ms')} ms, {rec['failed']} failed")


def add_na(raw, contender, workload, reason):
    append(raw, {"contender": contender, "workload": workload, "na": reason})


# ---------------------------------------------------------------- report

def peak_rss(s, contender):
    """The largest peak RSS over the rounds, in MiB, as a cell ("—" for direct or none)."""
    rv = [r["rss_kib"] for r in s.get("records", []) if r.get("rss_kib") is not None]
    return f"{max(rv) / 1024:.0f}" if rv and contender != "direct" else "—"


def ratios(s, contender, ref_nginx, ref_direct):
    """The × nginx and × direct cells of a row."""
    ratio_n = fmt_ratio(valid(s), ref_nginx) if contender != "nginx" else ("1.00×" if ref_nginx else "—")
    ratio_d = fmt_ratio(valid(s), ref_direct) if contender != "direct" else ("1.00×" if ref_direct else "—")
    return ratio_n, ratio_d


def fmt_num(x, digits=0):
    if x is None:
        return "—"
    if digits == 0:
        return f"{x:,.0f}"
    return f"{x:,.{digits}f}"


def fmt_ratio(x, ref):
    if x is None or ref is None or ref == 0:
        return "—"
    return f"{x / ref:.2f}×"


def summarize(records, workload, contender, metric):
    """-> dict(status, median, lo, hi, n, extra...) for one cell."""
    rs = [r for r in records if r["workload"] == workload and r["contender"] == contender]
    if not rs:
        return {"status": "not run"}
    na = [r for r in rs if "na" in r]
    if na:
        return {"status": "n/a", "why": na[0]["na"]}
    vals = [r[metric] for r in rs if metric in r]
    failed = [r for r in rs if metric not in r]
    # VOID: the transfer completed but the upstream did not get what it should have
    void = [r for r in rs if metric in r and not r.get("check", {}).get("ok")]
    out = {"status": "ok", "n": len(vals), "rounds": len(rs), "records": rs}
    if vals:
        out["median"] = statistics.median(vals)
        out["lo"], out["hi"] = min(vals), max(vals)
    if failed:
        out["status"] = "failed"
        out["why"] = " ".join(failed[0].get("error", "").split())
    if void:
        out["status"] = "VOID"
        c = void[0].get("check", {})
        out["why"] = "; ".join(c.get("why", [])) if c.get("why") else \
            f"upstream saw {c.get('real', '?')} real, {c.get('placeholder', '?')} placeholder, {c.get('other', '?')} other Authorization values"
    return out


def med(s, key, scale=1.0, digits=0):
    """median over the rounds of one field, formatted; "—" when absent"""
    vals = [r[key] for r in s.get("records", []) if r.get(key) is not None]
    if not vals:
        return "—"
    return fmt_num(statistics.median(vals) * scale, digits)


def cell(s, digits=0, suffix=""):
    if s["status"] == "n/a":
        return "n/a"
    if s["status"] == "not run":
        return "not run"
    if "median" not in s:
        return f"**failed** ({s['rounds']} of {s['rounds']} runs)"
    v = fmt_num(s["median"], digits) + suffix
    if s["status"] == "VOID":
        return f"~~{v}~~ **VOID**"
    if s["status"] == "failed":
        return f"{v} (**{s['rounds'] - s['n']} of {s['rounds']} runs failed**)"
    return v


def pct(s):
    v = med(s, "proxy_cpu_pct")
    return v + "%" if v != "—" else v


def spread(s):
    if "median" not in s or not s["median"] or s.get("n", 0) < 2:
        return "—"
    return f"±{(s['hi'] - s['lo']) / 2 / s['median'] * 100:.0f}%"


def valid(s):
    return s.get("median") if s.get("status") == "ok" else None


def check_text(s):
    if s["status"] in ("n/a", "not run"):
        return "—"
    if s["status"] == "VOID":
        return "**VOID**: " + s.get("why", "")[:160]
    if s["status"] == "failed":
        return "run failed: `" + s.get("why", "")[:160] + "`"
    return "✅"


def report(raw, meta_path, out_md, out_png):
    records = [json.loads(l) for l in open(raw) if l.strip()]
    meta = json.load(open(meta_path))
    contenders = [c for c in CONTENDERS if c in meta.get("contenders", CONTENDERS)]
    L = []
    m = meta["machine"]
    p = meta["params"]
    L.append("# Keyhole vs. peers: whole-proxy benchmark (latest run)")
    L.append("")
    L.append(f"Generated by `bench/run` on {meta['date']} (Keyhole {meta['versions'].get('keyhole', '?')}, "
             f"commit `{meta.get('commit', '?')}`). Regenerate: `bench/run` (as root).")
    L.append("")
    L.append("**Machine:** " + f"{m['cpu']}, {m['cores']} cores, {m['mem']}, kernel {m['kernel']}, {m['os']}.")
    L.append("")
    L.append("**Versions:** " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".")
    L.append("")
    L.append(f"**Method:** {p['rounds']} interleaved round(s) (every contender, workload by workload, order rotated "
             f"each round); each figure is the median over the rounds, ± is half the min–max spread. "
             f"Client (wrk 4.1 `-t1 -c{p['connections']}`, curl) and upstream (nginx, Python upload server) pinned "
             f"to cpu {p['client_cpu']}, the proxy to cpu {p['proxy_cpu']} (taskset). Three network namespaces "
             f"(client — proxy — upstream) joined by veth pairs; the upstream \"internet\" is 203.0.113.10. "
             f"Transparent contenders get the client's flows through a REDIRECT rule in the proxy namespace; "
             f"nginx is reached the same way but is configured as an ordinary reverse proxy for api.bench.test. "
             f"TLS 1.3 on every leg; every proxy verifies the upstream's certificate against the bench CA. "
             f"wrk runs {p['duration']} s per measurement; uploads are {p['upload_mib']} MiB of random bytes. "
             f"*Proxy CPU* is the user+system time of the proxy's processes during the measurement "
             f"(`/proc/PID/stat`, summed over the process tree), as a share of one core and per request: "
             f"it is steadier than throughput when the machine is shared, and shows whether the proxy "
             f"saturated its core (100%) or the client/upstream core was the limit.")
    L.append("")

    # (a) keep-alive
    L.append("## (a) HTTPS keep-alive, small requests")
    L.append("")
    L.append("`GET /` with `Authorization: Bearer $MSB_TOKEN` (the proxy puts the real value in; \"direct\" sends "
             "the real value itself), 32 keep-alive connections, response `ok`.")
    L.append("")
    L.append("| contender | requests/s | ± | p50 ms | p99 ms | × nginx | × direct | proxy CPU | CPU µs / request | wrk errors | upstream check |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    ka = {c: summarize(records, "ka", c, "rate") for c in contenders}
    ka_n, ka_d = valid(ka.get("nginx", {})), valid(ka.get("direct", {}))
    for c in contenders:
        s = ka[c]
        p50 = p99 = errs = "—"
        if "records" in s:
            vals50 = [r["p50_us"] for r in s["records"] if "p50_us" in r]
            vals99 = [r["p99_us"] for r in s["records"] if "p99_us" in r]
            if vals50:
                p50 = f"{statistics.median(vals50) / 1000:.2f}"
                p99 = f"{statistics.median(vals99) / 1000:.2f}"
                s["p99_ms"] = statistics.median(vals99) / 1000
            errs = str(sum(r.get("errors", 0) for r in s["records"]))
        L.append(f"| {LABELS[c]} | {cell(s)} | {spread(s)} | {p50} | {p99} | "
                 f"{fmt_ratio(valid(s), ka_n) if c != 'nginx' else '1.00×' if ka_n else '—'} | "
                 f"{fmt_ratio(valid(s), ka_d) if c != 'direct' else '1.00×' if ka_d else '—'} | "
                 f"{pct(s)} | {med(s, 'proxy_cpu_us_per_req', 1, 1)} | {errs} | {check_text(s)} |")
    kh, mi = valid(ka.get("keyhole", {})), valid(ka.get("mitmproxy", {}))
    if kh and mi:
        L.append("")
        L.append(f"Keyhole / mitmproxy: **{kh / mi:.1f}×** (target ≥ 20×); Keyhole / nginx: "
                 f"**{kh / ka_n:.2f}×** (target ≥ 0.8×)." if ka_n else f"Keyhole / mitmproxy: **{kh / mi:.1f}×**.")
    # The CPU ratio round by round: the two ran seconds apart in each round, so a round's
    # ratio is steadier than the ratio of the two medians when the machine's speed drifts.
    per_round = {}
    for r in records:
        if r.get("workload") == "ka" and r.get("contender") in ("keyhole", "nginx") and "proxy_cpu_us_per_req" in r:
            per_round.setdefault(r["round"], {})[r["contender"]] = r["proxy_cpu_us_per_req"]
    cpu_ratios = [v["keyhole"] / v["nginx"] for _, v in sorted(per_round.items()) if "keyhole" in v and "nginx" in v and v["nginx"]]
    if cpu_ratios:
        L.append("")
        L.append("Keyhole's CPU per request / nginx's, round by round: "
                 + ", ".join(f"{x:.2f}×" for x in cpu_ratios) + f" (median **{statistics.median(cpu_ratios):.2f}×**).")
    L.append("")

    # (b) new connections
    L.append("## (b) A new TLS connection per request")
    L.append("")
    L.append("Same request with `Connection: close`: wrk reconnects after every response. wrk keeps the TLS "
             "session of the previous connection and offers it again (TLS 1.3 ticket), so where the contender "
             "accepts resumption this measures mostly **resumed** handshakes (the \"client-leg resumption\" column, "
             "probed with `openssl s_client -sess_out`/`-sess_in` through each contender). nginx keeps a pool of upstream "
             "connections (`keepalive 64`), and so does Keyhole (verified upstream TLS connections, lent to the next client "
             "connection with the same SNI to the same address; a client's `Connection: close` is kept from the upstream): "
             "neither re-handshakes the upstream leg. mitmproxy and Squid open a new upstream connection per client "
             "connection. (f) shows Keyhole with its pool off.")
    L.append("")
    L.append("| contender | connections/s | ± | p99 ms | × nginx | × direct | proxy CPU | CPU µs / connection | client-leg resumption | wrk errors | upstream check |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|")
    nc = {c: summarize(records, "nc", c, "rate") for c in contenders}
    nc_n, nc_d = valid(nc.get("nginx", {})), valid(nc.get("direct", {}))
    for c in contenders:
        s = nc[c]
        p99 = errs = "—"
        if "records" in s:
            vals99 = [r["p99_us"] for r in s["records"] if "p99_us" in r]
            if vals99:
                p99 = f"{statistics.median(vals99) / 1000:.2f}"
            errs = str(sum(r.get("errors", 0) for r in s["records"]))
        res = meta.get("resumption", {}).get(c, "?")
        L.append(f"| {LABELS[c]} | {cell(s)} | {spread(s)} | {p99} | "
                 f"{fmt_ratio(valid(s), nc_n) if c != 'nginx' else '1.00×' if nc_n else '—'} | "
                 f"{fmt_ratio(valid(s), nc_d) if c != 'direct' else '1.00×' if nc_d else '—'} | "
                 f"{pct(s)} | {med(s, 'proxy_cpu_us_per_req')} | {res} | {errs} | {check_text(s)} |")
    L.append("")

    # (g) both cores
    if any(r["workload"] == "ka2" for r in records):
        L.append("## (g) Keep-alive with the proxy on both cores")
        L.append("")
        L.append(f"(a) again with the proxy allowed on cpus {p['client_cpu']},{p['proxy_cpu']}: nginx with two workers, Keyhole "
                 "with two event loops (one per usable core). The client (wrk with two threads) and the upstream share those "
                 "two cores with it, so no contender can double; the scaling column is the ratio to the same contender's "
                 "one-core (a) figure in this run.")
        L.append("")
        L.append("| contender | requests/s (1 core) | requests/s (2 cores) | ± | scaling 1 → 2 | × nginx (2 cores) | proxy CPU | CPU µs / request | upstream check |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        one = {c: summarize(records, "ka", c, "rate") for c in contenders}
        two = {c: summarize(records, "ka2", c, "rate") for c in contenders}
        two_n = valid(two.get("nginx", {}))
        for c in contenders:
            s2 = two[c]
            if "records" not in s2:
                continue
            s1 = one.get(c, {})
            scale = fmt_ratio(valid(s2), valid(s1)) if valid(s1) else "—"
            L.append(f"| {LABELS[c]} | {cell(s1) if 'records' in s1 else '—'} | {cell(s2)} | {spread(s2)} | {scale} | "
                     f"{fmt_ratio(valid(s2), two_n) if c != 'nginx' else '1.00×' if two_n else '—'} | "
                     f"{pct(s2)} | {med(s2, 'proxy_cpu_us_per_req', 1, 1)} | {check_text(s2)} |")
        L.append("")

    # (f) new connections, step by step
    nc0 = summarize(records, "nc0", "keyhole", "rate")
    if "records" in nc0:
        L.append("## (f) New connections, step by step")
        L.append("")
        L.append("The (b) workload through Keyhole with its upstream pool off (`--upstream-idle-timeout 0`: a full "
                 "upstream TCP + TLS handshake, certificate chain and name verification for every client connection) "
                 "and on (the default, as in (b)), beside nginx, from the same run.")
        L.append("")
        L.append("| contender | connections/s | ± | × nginx | proxy CPU | CPU µs / connection | upstream check |")
        L.append("|---|---:|---:|---:|---:|---:|---|")
        nc_n = valid(nc.get("nginx", {}))
        rows = [("Keyhole, upstream pool off", nc0), ("Keyhole, upstream pool on (default)", nc.get("keyhole", {}))]
        if "nginx" in nc:
            rows.append((LABELS["nginx"], nc["nginx"]))
        for label, s in rows:
            if "records" not in s:
                continue
            L.append(f"| {label} | {cell(s)} | {spread(s)} | "
                     f"{fmt_ratio(valid(s), nc_n) if label != LABELS['nginx'] else '1.00×' if nc_n else '—'} | "
                     f"{pct(s)} | {med(s, 'proxy_cpu_us_per_req')} | {check_text(s)} |")
        L.append("")

    # (c), (d) uploads
    for wl, title, text in (
        ("up", f"(c) {p['upload_mib']} MiB upload, body substitution off",
         "`POST` with `Content-Length`, random bytes (no placeholder), placeholder in `Authorization`. "
         "Throughput = body size / curl's total time; the upstream reads the whole body before it answers. "
         "Peak RSS = `VmHWM` of the proxy's processes (summed for nginx master + worker, Squid + its cert "
         "helpers), reset through `/proc/PID/clear_refs` before each upload; the table shows the largest over the rounds. "
         "Client and upstream share one core, so throughput is capped by what curl and the upstream manage there "
         "(see \"direct\"); *proxy CPU s / GiB* is each proxy's own cost."),
        ("inj", f"(d) {p['upload_mib']} MiB upload with body injection",
         "The same bytes with `$MSB_TOKEN` written into every MiB, sent `Transfer-Encoding: chunked` "
         "(Keyhole holds a `Content-Length` body for substitution only up to 64 MiB; a chunked body is "
         "re-framed and streamed). Keyhole runs a second instance whose policy has `inject: {body: true}`; "
         "mitmproxy streams the body through a replacing function in its addon; \"direct\" sends the body "
         "with the real values already in. The upstream checks that every placeholder arrived as the real value."),
    ):
        if not any(r["workload"] == wl for r in records):
            continue  # not in WORKLOADS this run
        L.append(f"## {title}")
        L.append("")
        L.append(text)
        L.append("")
        with_nginx = wl != "inj"  # nginx cannot take part in (d)
        L.append("| contender | MiB/s | ± |" + (" × nginx |" if with_nginx else "") + " × direct | proxy CPU s / GiB | peak RSS (MiB) | upstream check |")
        L.append("|---|---:|---:|" + ("---:|" if with_nginx else "") + "---:|---:|---:|---|")
        up = {c: summarize(records, wl, c, "mib_s") for c in contenders}
        up_n, up_d = valid(up.get("nginx", {})), valid(up.get("direct", {}))
        for c in contenders:
            s = up[c]
            rss = peak_rss(s, c)
            ratio_n, ratio_d = ratios(s, c, up_n, up_d)
            cl = cell(s, 1)
            if s["status"] == "n/a":
                cl = f"n/a ({s['why']})"
            L.append(f"| {LABELS[c]} | {cl} | {spread(s)} |" + (f" {ratio_n} |" if with_nginx else "") + f" {ratio_d} | "
                     f"{med(s, 'proxy_cpu_s_per_gib', 1, 2)} | {rss} | {check_text(s)} |")
        L.append("")

    # (e) download
    L.append(f"## (e) {p['upload_mib']} MiB download, the real value reflected in every MiB")
    L.append("")
    L.append("`GET` answered with `Content-Length` by an upstream that puts the real value into every MiB of the "
             "body (an echo, at volume). Keyhole masks it on the way back (response masking: the value becomes "
             "`$MSB_TOKEN` padded to its length); the other contenders pass it through. Throughput = body size / "
             "curl's total time; peak RSS as in (c).")
    L.append("")
    L.append("| contender | MiB/s | ± | × nginx | × direct | proxy CPU s / GiB | peak RSS (MiB) | real values at the guest | check |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    dl = {c: summarize(records, "dl", c, "mib_s") for c in contenders}
    dl_n, dl_d = valid(dl.get("nginx", {})), valid(dl.get("direct", {}))
    for c in contenders:
        s_ = dl[c]
        rss = peak_rss(s_, c)
        ra = [r["check"].get("real_at_guest") for r in s_.get("records", []) if r.get("check")]
        ra = [x for x in ra if x is not None]
        real_at = str(max(ra)) if ra else "—"
        ratio_n, ratio_d = ratios(s_, c, dl_n, dl_d)
        L.append(f"| {LABELS[c]} | {cell(s_, 1)} | {spread(s_)} | {ratio_n} | {ratio_d} | "
                 f"{med(s_, 'proxy_cpu_s_per_gib', 1, 2)} | {rss} | {real_at} | {check_text(s_)} |")
    L.append("")

    # (h2) HTTP/2 keep-alive
    h2c = [c for c in contenders if c in ("direct", "nginx", "keyhole")]
    if any(r["workload"] == "h2" for r in records):
        L.append("## (h2) HTTP/2 keep-alive, small requests")
        L.append("")
        L.append(f"h2load (nghttp2) `-t1 -c{p['connections']} -m{p.get('h2_streams', 10)}`: {p['connections']} HTTP/2 "
                 f"connections with {p.get('h2_streams', 10)} concurrent streams each, `GET /` with "
                 "`authorization: Bearer $MSB_TOKEN`, for the same duration as wrk. Keyhole speaks HTTP/2 on both "
                 "legs (the upstream nginx has `http2`), each stream through the engine; nginx speaks HTTP/2 to the "
                 "client and HTTP/1.1 to the upstream over its keep-alive pool (it proxies HTTP/2 only through "
                 "`grpc_pass`). mitmproxy and Squid are not in this table. h2load does not verify certificates.")
        L.append("")
        L.append("| contender | requests/s | ± | mean ms | × nginx | × direct | proxy CPU | CPU µs / request | h2load errors | upstream check |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        h2 = {c: summarize(records, "h2", c, "rate") for c in h2c}
        h2_n, h2_d = valid(h2.get("nginx", {})), valid(h2.get("direct", {}))
        for c in h2c:
            s_ = h2[c]
            mean = errs = "—"
            if "records" in s_:
                means = [r["mean_us"] for r in s_["records"] if "mean_us" in r]
                if means:
                    mean = f"{statistics.median(means) / 1000:.2f}"
                errs = str(sum(r.get("errors", 0) for r in s_["records"]))
            L.append(f"| {LABELS[c]} | {cell(s_)} | {spread(s_)} | {mean} | "
                     f"{fmt_ratio(valid(s_), h2_n) if c != 'nginx' else '1.00×' if h2_n else '—'} | "
                     f"{fmt_ratio(valid(s_), h2_d) if c != 'direct' else '1.00×' if h2_d else '—'} | "
                     f"{pct(s_)} | {med(s_, 'proxy_cpu_us_per_req', 1, 1)} | {errs} | {check_text(s_)} |")
        L.append("")

    # (h) many idle connections
    idle = [r for r in records if r["workload"] == "idle" and "error" not in r]
    if idle:
        n = p.get("idle_connections", 10000)
        L.append(f"## (h) {n:,} idle keep-alive TLS connections")
        L.append("")
        L.append(f"{n:,} TLS connections opened through the contender (64 handshakes at a time, Python asyncio), one request "
                 "each, then left open and idle. RSS is the proxy's (VmRSS over its process tree) before the first and after "
                 "the last was open; per connection = the difference / the connections open. While all are open, one more "
                 "connection makes 500 keep-alive requests one after another: their latency. A quiet guest connection "
                 "in Keyhole gives its upstream connection back after `--upstream-detach-after` (0.5 s), as nginx's "
                 "clients share its upstream pool: each holds the client's TLS connection only. Why Keyhole's is "
                 "larger: README, \"Memory per connection\".")
        L.append("")
        L.append("| contender | open | RSS before MiB | RSS after MiB | KiB / connection | × nginx | p50 ms | p99 ms | seconds to open | check |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        by = {r["contender"]: r for r in idle}
        base = by.get("nginx", {}).get("kib_per_connection")
        for c in contenders:
            r = by.get(c)
            if not r:
                continue
            kib = r.get("kib_per_connection")
            ratio = f"{kib / base:.2f}×" if kib and base else "—"
            L.append(f"| {LABELS[c]} | {r['open']:,} | {r['rss_before_kib'] / 1024:.0f} | {r['rss_after_kib'] / 1024:.0f} | "
                     f"{kib if kib is not None else '—'} | {ratio} | {r.get('p50_ms')} | {r.get('p99_ms')} | "
                     f"{r.get('seconds_to_open')} | {'✅' if r['check']['ok'] else '❌ ' + r['check']['why']} |")
        L.append("")

    notes = meta.get("notes", [])
    if notes:
        L.append("## Notes")
        L.append("")
        for n in notes:
            L.append(f"- {n}")
        L.append("")
    md = "\n".join(L)
    with open(out_md, "w") as f:
        f.write(md)
    chart(contenders, ka, nc, {c: summarize(records, "up", c, "mib_s") for c in contenders}, meta, out_png)
    print(md)


def chart(contenders, ka, nc, up, meta, out_png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    names = [LABELS[c].replace(" (", "\n(") for c in contenders]
    colors = ["#888888" if c == "direct" else "#d62728" if c == "keyhole" else "#1f77b4" for c in contenders]

    def panel(ax, values, title, unit, fmt):
        vals = [v if v is not None else 0 for v, _ in values]
        bars = ax.bar(range(len(values)), vals, color=colors)
        for i, (v, status) in enumerate(values):
            label = status if status not in ("ok",) else fmt.format(v)
            if status == "VOID":
                bars[i].set_hatch("//")
                label = "VOID " + (fmt.format(v) if v is not None else "")
            ax.annotate(label, (i, vals[i]), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(values)))
        ax.set_xticklabels(names, fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit)
        ax.margins(y=0.15)

    def vals(summary, key="median"):
        out = []
        for c in contenders:
            s = summary[c]
            out.append((s.get(key), s["status"]))
        return out

    def ratios(summary):
        """Each contender's median as a multiple of nginx's (same run)."""
        ref = summary.get("nginx", {}).get("median")
        out = []
        for c in contenders:
            s = summary[c]
            v = s.get("median")
            out.append((v / ref if v is not None and ref else None, s["status"] if ref else "no nginx"))
        return out

    def ratio_panel(ax, summary, title):
        panel(ax, ratios(summary), title, "× nginx", "{:.2f}×")
        ax.axhline(1.0, color="#1f77b4", linewidth=0.8, linestyle="--")

    ratio_panel(axes[0][0], ka, "(a) keep-alive requests/s, × nginx (higher is better)")
    panel(axes[0][1], vals(ka, "p99_ms"), "(a) keep-alive p99 latency (lower is better)", "ms", "{:.2f}")
    ratio_panel(axes[1][0], nc, "(b) new TLS connections/s, × nginx (higher is better)")
    ratio_panel(axes[1][1], up, f"(c) {meta['params']['upload_mib']} MiB upload, × nginx (higher is better)")
    m = meta["machine"]
    fig.suptitle(f"Keyhole vs. peers — {m['cpu']}, {m['cores']} cores, median of {meta['params']['rounds']} round(s), "
                 f"{meta['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "render":
        render(args[0], args[1], args[2:])
    elif cmd == "mkbody":
        mkbody(*args)
    elif cmd == "auth-check":
        print(json.dumps(auth_check(*args)))
    elif cmd == "add-wrk":
        add_wrk(*args)
    elif cmd == "add-h2load":
        add_h2load(*args)
    elif cmd == "add-upload":
        add_upload(*args)
    elif cmd == "add-download":
        add_download(*args)
    elif cmd == "add-idle":
        add_idle(*args)
    elif cmd == "add-na":
        add_na(*args)
    elif cmd == "report":
        report(*args)
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
