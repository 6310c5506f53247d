import Foundation
import Testing

/// The CA trust kit: `keyhole ca install-script` run in a fresh guest (its own /etc and
/// /usr/local/share, overlaid in a private mount namespace) makes Python requests, httpx
/// and Node trust the sandbox CA; before it, their refusal is audited as
/// `guest-does-not-trust-ca`. Root only; CI runs as root.
@Suite("CA trust kit end to end", .serialized, .enabled(if: isRoot, "needs root for namespaces"))
struct CATrustKitEndToEndTests {
    static let policy = """
        version: 1
        name: trust
        secrets:
          - env: TOKEN
            value: "e2e-real-token-0001"
            allow_hosts: [api.example.test]
        network:
          on_secret_violation: block-and-log
          upstream_ca: [{{DIR}}/upca.pem]
        """

    @Test func theInstallScriptMakesRuntimesWithTheirOwnBundlesTrustTheCA() throws {
        let harness = try ProxyHarness()
        defer { harness.close() }
        let log = try harness.upstream("203.0.113.10", port: 443, cert: "api.example.test")
        try harness.startProxy(policy: Self.policy)
        let script = try CLI.run(["ca", "install-script", "--state-dir", harness.stateDirectory])
        #expect(script.status == 0, "\(script.stderr)")
        #expect(script.stdout.hasPrefix("#!/bin/sh\n"))
        try script.stdout.write(toFile: harness.directory + "/keyhole-ca.sh", atomically: true, encoding: .utf8)

        let clients = """
            /usr/bin/python3 - <<'PY' || true
            import requests
            try:
                r = requests.get("https://api.example.test/requests", headers={"Authorization": "Bearer $MSB_TOKEN"}, timeout=10)
                print("requests", r.status_code, r.text.strip())
            except Exception as e:
                print("requests-failed", type(e).__name__)
            PY
            /usr/bin/python3 - <<'PY' || true
            import httpx
            try:
                r = httpx.get("https://api.example.test/httpx", headers={"Authorization": "Bearer $MSB_TOKEN"}, timeout=10)
                print("httpx", r.status_code, r.text.strip())
            except Exception as e:
                print("httpx-failed", type(e).__name__)
            PY
            node -e 'require("https").get("https://api.example.test/node", {headers: {Authorization: "Bearer $MSB_TOKEN"}}, r => { let d = ""; r.on("data", c => d += c); r.on("end", () => console.log("node", r.statusCode, d.trim())) }).on("error", e => console.log("node-failed", e.code))' || true
            """
        let inner = """
            set -e
            t=$(mktemp -d)
            mkdir -p $t/eu $t/ew $t/su $t/sw
            mount --make-rprivate /
            mount -t overlay overlay -o lowerdir=/etc,upperdir=$t/eu,workdir=$t/ew /etc
            mount -t overlay overlay -o lowerdir=/usr/local/share,upperdir=$t/su,workdir=$t/sw /usr/local/share
            echo '203.0.113.10 api.example.test' >> /etc/hosts
            echo '--- before'
            \(clients)
            sh \(harness.directory)/keyhole-ca.sh
            . /etc/profile.d/keyhole-ca.sh
            echo '--- after'
            \(clients)
            sh \(harness.directory)/keyhole-ca.sh >/dev/null
            echo "environment lines: $(grep -c '^NODE_EXTRA_CA_CERTS=' /etc/environment)"
            """
        try inner.write(toFile: harness.directory + "/trust-test.sh", atomically: true, encoding: .utf8)
        let run = try harness.guest("unshare -m sh \(harness.directory)/trust-test.sh", timeout: 120)
        let parts = run.stdout.components(separatedBy: "--- after")
        try #require(parts.count == 2, "\(run.stdout) \(run.stderr)")
        let before = parts[0], after = parts[1]
        for client in ["requests", "httpx", "node"] {
            #expect(before.contains("\(client)-failed"), "\(client) trusted the CA before the script: \(before)")
            #expect(after.contains("\(client) 200 ok"), "\(client) after the script: \(after) \(run.stderr)")
        }
        #expect(after.contains("environment lines: 1"), "running the script again keeps one set of lines")
        // The refusals were audited with the cause, and the requests after reached the upstream
        // with the value.
        #expect(harness.audit.contains("\"event\":\"guest-does-not-trust-ca\""), "\(harness.audit)")
        let targets = harness.records(log).compactMap { $0["target"] as? String }
        #expect(targets == ["/requests", "/httpx", "/node"])
        #expect(harness.records(log).allSatisfy { harness.header($0, "Authorization") == "Bearer e2e-real-token-0001" })
        // The host's own trust store was not touched.
        #expect(!FileManager.default.fileExists(atPath: "/etc/keyhole/sandbox-ca.pem"))
        #expect(!FileManager.default.fileExists(atPath: "/usr/local/share/ca-certificates/keyhole-sandbox-ca.crt"))
    }
}
