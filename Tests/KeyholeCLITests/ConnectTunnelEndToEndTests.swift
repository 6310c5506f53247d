import Foundation
import Testing

/// A guest behind an explicit proxy (`HTTPS_PROXY`, corporate images) sends CONNECT to a
/// proxy address; Keyhole answers it itself (nothing listens at proxy.example.test:3128),
/// resolves the host through its trusted resolver, and intercepts the TLS inside like a
/// direct flow: substitution works, and every identity check still holds.
@Suite("CONNECT tunnels end to end", .serialized, .enabled(if: isRoot, "needs root for network namespaces"))
struct ConnectTunnelEndToEndTests {
    static let realValue = "tunnel-real-token-0014"
    static let policy = ApplianceEndToEndTests.policy.replacingOccurrences(of: ApplianceEndToEndTests.realValue, with: realValue)
    static let proxy = "http://proxy.example.test:3128"

    @Test func theTLSInsideAConnectIsInterceptedAndSubstituted() throws {
        let harness = try ProxyHarness(mode: .appliance)
        defer { harness.close() }
        let api = try harness.upstream("203.0.113.10", port: 443, cert: "api.example.test")
        try harness.startProxy(policy: Self.policy)

        // curl --proxy, and HTTPS_PROXY as corporate images set it.
        let ok = try harness.guestCurl("https://api.example.test/tunnel", "--proxy \(Self.proxy) -H 'Authorization: Bearer $MSB_TOKEN'")
        #expect(ok.stdout == "ok\n", "\(ok.stderr)\n\(harness.audit)")
        let viaEnvironment = try harness.guest(
            "HTTPS_PROXY=\(Self.proxy) curl -sS --max-time 8 --cacert \(harness.stateDirectory)/ca.pem -H 'X-Key: $MSB_TOKEN' https://api.example.test/env")
        #expect(viaEnvironment.stdout == "ok\n", "\(viaEnvironment.stderr)")
        let records = harness.records(api)
        #expect(records.count == 2)
        #expect(harness.header(records.first ?? [:], "Authorization") == "Bearer \(Self.realValue)")
        #expect(harness.header(records.last ?? [:], "X-Key") == Self.realValue)
        #expect(harness.audit.contains("\"event\":\"tunnel\""), "\(harness.audit)")
        // The CONNECT host was resolved through the trusted resolver and pinned: the
        // substitution passed the DNS check (no dns-not-pinned).
        #expect(!harness.audit.contains("dns-not-pinned"))
        for text in [harness.audit, harness.stderr, ok.stderr] { #expect(!text.contains(Self.realValue)) }
    }

    @Test func insideATunnelEveryIdentityRuleStillHolds() throws {
        let harness = try ProxyHarness(mode: .appliance)
        defer { harness.close() }
        let api = try harness.upstream("203.0.113.10", port: 443, cert: "api.example.test")
        let other = try harness.upstream("203.0.113.11", port: 443, cert: "other.example.test")
        try harness.startProxy(policy: Self.policy)

        // CONNECT to api.example.test, TLS inside for other.example.test: refused.
        let fronted = try harness.guestCurl(
            "https://other.example.test/fronted",
            "--proxy \(Self.proxy) --connect-to other.example.test:443:api.example.test:443 -H 'Authorization: Bearer $MSB_TOKEN'")
        #expect(fronted.status != 0 && fronted.stdout.isEmpty, "\(fronted.all)")
        #expect(harness.audit.contains("\"event\":\"tunnel-sni-mismatch\""), "\(harness.audit)")

        // The placeholder to a host it is not allowed for, through the tunnel: a violation.
        let elsewhere = try harness.guestCurl("https://other.example.test/steal", "--proxy \(Self.proxy) -H 'Authorization: Bearer $MSB_TOKEN'")
        #expect(elsewhere.status != 0, "\(elsewhere.all)")
        #expect(harness.records(other).isEmpty)

        // A placeholder in the CONNECT request's own headers: never substituted (the head
        // goes nowhere), a violation.
        let inHead = try harness.guestCurl("https://api.example.test/head", "--proxy \(Self.proxy) --proxy-header 'X-Proxy-Token: $MSB_TOKEN'")
        #expect(inHead.status != 0, "\(inHead.all)")
        #expect(harness.records(api).isEmpty)
        let violations = harness.audit.split(separator: "\n").filter { $0.contains("\"event\":\"violation\"") }
        #expect(violations.count == 2, "\(harness.audit)")

        // A CONNECT host that no trusted answer resolves, and one egress denies.
        let unknown = try harness.guestCurl("https://nowhere.example.test/", "--proxy \(Self.proxy)")
        #expect(unknown.status != 0)
        #expect(harness.audit.contains("does not resolve through a trusted resolver"), "\(harness.audit)")
        let metadata = try harness.guestCurl("https://169.254.169.254/latest/meta-data/", "--proxy \(Self.proxy) -k")
        #expect(metadata.status != 0)
        #expect(harness.audit.contains("\"event\":\"egress-denied\""), "\(harness.audit)")
        for text in [harness.audit, harness.stderr] { #expect(!text.contains(Self.realValue)) }
    }

    @Test func plainHTTPInsideATunnelIsParsedAndGuarded() throws {
        let harness = try ProxyHarness(mode: .appliance)
        defer { harness.close() }
        let plain = try harness.upstream("203.0.113.10", port: 80, cert: nil)
        try harness.startProxy(policy: Self.policy)
        let ok = try harness.guest("curl -sS --max-time 8 --proxytunnel --proxy \(Self.proxy) http://api.example.test/plain")
        #expect(ok.stdout == "ok\n", "\(ok.all)\n\(harness.audit)")
        // The secret needs a verified TLS identity: over plain HTTP, even to its allowed host
        // through a tunnel, the placeholder is a violation.
        let leak = try harness.guest(
            "curl -sS --max-time 8 --proxytunnel --proxy \(Self.proxy) -H 'Authorization: Bearer $MSB_TOKEN' http://api.example.test/leak")
        #expect(leak.status != 0, "\(leak.all)")
        let records = harness.records(plain)
        #expect(records.count == 1 && (records.first?["target"] as? String) == "/plain", "\(records)")
        #expect(harness.audit.contains("\"event\":\"violation\""), "\(harness.audit)")
        #expect(!harness.audit.contains(Self.realValue))
    }

    /// Whatever `network.egress` allows, a tunnel never reaches the appliance itself: its
    /// loopback services (metrics) and its own addresses.
    @Test func aTunnelNeverReachesTheApplianceItself() throws {
        let harness = try ProxyHarness(mode: .appliance)
        defer { harness.close() }
        let open = Self.policy.replacingOccurrences(of: "  gateway: 10.0.2.1/30\n", with: "  gateway: 10.0.2.1/30\n  egress: { default: all }\n")
        #expect(open != Self.policy)
        try harness.startProxy(policy: open)
        for target in ["127.0.0.1:\(harness.metricsPort)", "[::1]:\(harness.metricsPort)", "10.0.2.1:\(harness.metricsPort)", "0.0.0.0:80"] {
            let probe = try harness.exchange(
                ip: "203.0.113.13", port: 3128, tls: false,
                requests: ["CONNECT \(target) HTTP/1.1\r\n\r\n", "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"])
            #expect(!probe.stdout.contains("keyhole_"), "\(target): \(probe.all)")
            #expect(!probe.stdout.contains("200 Connection established"), "\(target): \(probe.all)")
        }
        #expect(harness.audit.components(separatedBy: "\"event\":\"egress-denied\"").count - 1 == 4, "\(harness.audit)")
    }
}
