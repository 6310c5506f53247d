import Foundation
import Testing

/// `network.block_response: http`: a blocked request gets a 403 whose JSON body says why
/// (an agent can read it; a reset looks like a flaky network), and nothing of it goes
/// upstream. Root only; CI runs as root.
@Suite("Block response end to end", .serialized, .enabled(if: isRoot, "needs root for network namespaces"))
struct BlockResponseEndToEndTests {
    static let realValue = "e2e-real-token-0001"
    static let otherValue = "e2e-other-value-0002"

    static func policy(_ response: String) -> String {
        """
        version: 1
        name: blocks
        secrets:
          - env: TOKEN
            value: "\(realValue)"
            allow_hosts: [api.example.test]
            inject: { headers: true, body: true }
          - env: OTHER
            value: "\(otherValue)"
            allow_hosts: [other.example.test]
        network:
          on_secret_violation: block-and-log
          block_response: \(response)
          upstream_ca: [{{DIR}}/upca.pem]
        """
    }

    @Test func aBlockedRequestGetsA403ThatSaysWhyAndNothingGoesUpstream() throws {
        let harness = try ProxyHarness()
        defer { harness.close() }
        let log = try harness.upstream("203.0.113.10", port: 443, cert: "api.example.test")
        try harness.startProxy(policy: Self.policy("http"))

        // A placeholder for a host it is not allowed for, in a header.
        let header = try harness.curl("https://api.example.test/x", "-sS -D - -H 'X-Key: $MSB_OTHER'")
        #expect(header.status == 0, "\(header.stderr)")
        #expect(header.stdout.hasPrefix("HTTP/1.1 403 Forbidden\r\n"), "\(header.stdout)")
        let body = String(header.stdout.split(separator: "\r\n\r\n", maxSplits: 1).last ?? "")
        let fields = (try? JSONSerialization.jsonObject(with: Data(body.utf8)) as? [String: String]) ?? [:]
        #expect(fields["error"] == "blocked_by_keyhole")
        #expect(fields["secret"] == "OTHER")
        #expect(fields["host"] == "api.example.test")
        #expect(fields["reason"] == "host-not-allowed")
        #expect(fields["site"] == "header")
        #expect(fields["hint"] != nil)
        // In a Content-Length body (held for substitution: nothing of it went upstream).
        let inBody = try harness.curl("https://api.example.test/y", "-sS -X POST --data-binary 'k=$MSB_OTHER'")
        #expect(inBody.stdout.contains("\"reason\":\"host-not-allowed\"") && inBody.stdout.contains("\"site\":\"body\""), "\(inBody.stdout)")
        // Domain fronting: the Host names another host than the TLS name.
        let fronted = try harness.curl("https://api.example.test/z", "-sS -H 'Host: evil.example.test'")
        #expect(fronted.stdout.contains("\"reason\":\"host-not-sni\""), "\(fronted.stdout)")
        // An allowed request on the same setup still goes through and is substituted.
        let allowed = try harness.curl("https://api.example.test/ok", "-sS -H 'Authorization: Bearer $MSB_TOKEN'")
        #expect(allowed.stdout == "ok\n", "\(allowed.stdout) \(allowed.stderr)")

        let records = harness.records(log)
        #expect(records.map { $0["target"] as? String } == ["/ok"], "only the allowed request reached the upstream")
        for text in [header.stdout, inBody.stdout, fronted.stdout, harness.audit] {
            #expect(!text.contains(Self.realValue) && !text.contains(Self.otherValue))
        }
        #expect(harness.audit.contains("\"response\":\"http-403\""))
    }

    @Test func theDefaultIsAReset() throws {
        let harness = try ProxyHarness()
        defer { harness.close() }
        _ = try harness.upstream("203.0.113.10", port: 443, cert: "api.example.test")
        try harness.startProxy(policy: Self.policy("reset"))
        let header = try harness.curl("https://api.example.test/x", "-sS -H 'X-Key: $MSB_OTHER'")
        #expect(header.status != 0 && header.stdout.isEmpty)
        #expect(harness.audit.contains("\"response\":\"reset\""))
    }
}
