-- wrk script for bench/run: one GET per request with the credential in Authorization.
--   KHB_AUTH   the header value to send ("Bearer $MSB_TOKEN" through a proxy, the real
--              value for "direct")
--   KHB_CLOSE  "1": send "Connection: close", so every request opens a new TLS connection
-- At the end it prints one line "KHBJSON {...}" that bench/lib/khb.py parses.
wrk.method = "GET"
wrk.path = "/"
wrk.headers["Host"] = "api.bench.test"
wrk.headers["Authorization"] = os.getenv("KHB_AUTH")
if os.getenv("KHB_CLOSE") == "1" then
  wrk.headers["Connection"] = "close"
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'KHBJSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d}\n',
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout))
end
