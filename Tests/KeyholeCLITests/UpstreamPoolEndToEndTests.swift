import Foundation
import Testing

/// The upstream pool with real clients: a guest connection that ends cleanly leaves its
/// verified upstream TLS connection for the next guest connection to the same name and
/// address; everything checked per guest connection is still checked. Root only.
@Suite("Upstream pool end to end", .serialized, .enabled(if: isRoot, "needs root for network namespaces"))
struct UpstreamPoolEndToEndTests {
    static let realValue = "pool-real-token-0001"

    static let policy = """
        version: 1
        name: pool
        secrets:
          - env: TOKEN
            value: "\(realValue)"
            allow_hosts: [api.example.test]
        network:
          on_secret_violation: block-and-log
          upstream_ca: [{{DIR}}/upca.pem]
        """

    func counter(_ harness: ProxyHarness, _ name: String) -> Int {
        let text = (try? harness.metricsText()) ?? ""
        let line = text.split(separator: "\n").first { $0.hasPrefix(name + " ") || $0.hasPrefix(name + "{") }
        return line.flatMap { Int(Double($0.split(separator: " ").last ?? "") ?? -1) } ?? 0
    }

    @Test func guestConnectionsOneAfterAnotherShareOneVerifiedUpstreamConnection() throws {
        let harness = try ProxyHarness()
        defer { harness.close() }
        let log = try harness.upstream("203.0.113.10", port: 443, cert: "api.example.test")
        // One event loop: idle connections are pooled per loop (see the next test for two).
        try harness.startProxy(policy: Self.policy, extra: ["--threads", "1", "--upstream-idle-timeout", "30"])

        let first = try harness.curl("https://api.example.test/one", "-H 'Authorization: Bearer $MSB_TOKEN'")
        #expect(first.stdout == "ok\n", "\(first.stderr)")
        // The guest asks to close: the upstream is not told (its connection stays for the
        // pool), the guest is, and its connection ends after the response.
        let closing = try harness.curl("https://api.example.test/two", "-D - -H 'Authorization: Bearer $MSB_TOKEN' -H 'Connection: close'")
        #expect(closing.stdout.contains("ok\n"), "\(closing.stderr)")
        #expect(closing.stdout.lowercased().contains("connection: close\r\n"), "\(closing.stdout)")
        let third = try harness.curl("https://api.example.test/three", "-H 'Authorization: Bearer $MSB_TOKEN'")
        #expect(third.stdout == "ok\n", "\(third.stderr)")

        let records = harness.records(log)
        try #require(records.count == 3)
        #expect(records.map { $0["target"] as? String } == ["/one", "/two", "/three"])
        // Each request was substituted (its guest connection passed every check of its own)…
        for record in records { #expect(harness.header(record, "Authorization") == "Bearer \(Self.realValue)") }
        #expect(harness.header(records[1], "Connection") == nil)
        // …and all three came over one upstream connection.
        let peers = Set(records.compactMap { $0["peer"] as? String })
        #expect(peers.count == 1, "\(peers)")
        #expect(counter(harness, "keyhole_upstream_reused_total") == 2)
        #expect(harness.audit.components(separatedBy: "\"event\":\"substituted\"").count - 1 == 3)
        #expect(!harness.audit.contains(Self.realValue) && !harness.stderr.contains(Self.realValue))
    }

    @Test func eachEventLoopKeepsItsOwnIdleConnections() throws {
        let harness = try ProxyHarness()
        defer { harness.close() }
        let log = try harness.upstream("203.0.113.10", port: 443, cert: "api.example.test")
        try harness.startProxy(policy: Self.policy, extra: ["--threads", "2", "--upstream-idle-timeout", "30"])
        for n in 0..<6 { #expect(try harness.curl("https://api.example.test/\(n)").stdout == "ok\n") }
        // Guest connections take turns on the two loops: two upstream connections in all.
        #expect(Set(harness.records(log).compactMap { $0["peer"] as? String }).count == 2)
        #expect(counter(harness, "keyhole_upstream_reused_total") == 4)
    }

    @Test func aPooledConnectionServesOnlyTheNameItWasVerifiedFor() throws {
        let harness = try ProxyHarness()
        defer { harness.close() }
        // One upstream address whose certificate names api.example.test only.
        let log = try harness.upstream("203.0.113.10", port: 443, cert: "api.example.test")
        try harness.startProxy(policy: Self.policy, pins: ["api.example.test=203.0.113.10", "other.example.test=203.0.113.10"], extra: ["--threads", "1", "--upstream-idle-timeout", "30"])

        #expect(try harness.curl("https://api.example.test/warm").stdout == "ok\n")
        // Another name to the same address gets a handshake of its own, which fails: the
        // idle connection verified for api.example.test is not lent to it.
        let other = try harness.curl("https://other.example.test/steal")
        #expect(other.status != 0)
        #expect(harness.audit.contains("\"event\":\"upstream-tls-failed\""), "\(harness.audit)")
        #expect(harness.audit.contains("\"sni\":\"other.example.test\""))
        // The pooled connection is still there for its own name.
        #expect(try harness.curl("https://api.example.test/again").stdout == "ok\n")
        // Domain fronting on a reused connection is refused as on any other, and that
        // upstream connection is dropped, not pooled: the next guest gets a new one.
        let fronted = try harness.curl("https://api.example.test/front", "-H 'Host: other.example.test'")
        #expect(fronted.status != 0)
        #expect(harness.audit.contains("\"event\":\"host-mismatch\""))
        #expect(try harness.curl("https://api.example.test/last").stdout == "ok\n")
        let records = harness.records(log)
        try #require(records.count == 3)
        #expect(records.map { $0["target"] as? String } == ["/warm", "/again", "/last"])
        let peers = records.map { $0["peer"] as? String }
        #expect(peers[0] == peers[1])
        #expect(peers[2] != peers[0])
    }

    @Test func aPolicyReloadRetiresEveryConnectionPooledBeforeIt() throws {
        let harness = try ProxyHarness()
        defer { harness.close() }
        let log = try harness.upstream("203.0.113.10", port: 443, cert: "api.example.test")
        try harness.startProxy(policy: Self.policy, extra: ["--threads", "1", "--upstream-idle-timeout", "30"])
        #expect(try harness.curl("https://api.example.test/before").stdout == "ok\n")
        let pid = try #require(try harness.proxyPID())
        kill(pid, SIGHUP)
        try harness.waitFor(file: harness.proxyStderr, containing: "reloaded")
        let after = try harness.curl("https://api.example.test/after", "-H 'Authorization: Bearer $MSB_TOKEN'")
        #expect(after.stdout == "ok\n", "\(after.stderr)")
        let records = harness.records(log)
        try #require(records.count == 2)
        #expect(Set(records.compactMap { $0["peer"] as? String }).count == 2)
        #expect(harness.header(records[1], "Authorization") == "Bearer \(Self.realValue)")
    }

    @Test func anIdleConnectionOnWhichTheUpstreamSpeaksUnaskedIsNeverLent() throws {
        let harness = try ProxyHarness()
        defer { harness.close() }
        // After every response, 300 ms later, a second response nobody asked for.
        let log = try harness.upstream("203.0.113.10", port: 443, cert: "api.example.test", extra: ["--stray", "300"])
        try harness.startProxy(policy: Self.policy, extra: ["--threads", "1", "--upstream-idle-timeout", "30"])
        #expect(try harness.curl("https://api.example.test/first").stdout == "ok\n")
        Thread.sleep(forTimeInterval: 1)  // the stray response reaches the idle pooled connection
        // The next guest connection gets its own answer, not the stray one, over a new connection.
        let second = try harness.curl("https://api.example.test/second", "-H 'Authorization: Bearer $MSB_TOKEN'")
        #expect(second.stdout == "ok\n", "\(second.stdout) \(second.stderr)")
        let records = harness.records(log)
        try #require(records.count == 2)
        #expect(Set(records.compactMap { $0["peer"] as? String }).count == 2)
        #expect(counter(harness, "keyhole_upstream_reused_total") == 0)
    }

    /// A guest's keep-alive connection that goes quiet: its requests, `GAP` seconds apart.
    func keepAliveGuest(_ harness: ProxyHarness, paths: [String], gap: Double) throws -> CLI.Result {
        try harness.guest(
            """
            python3 - <<'EOF'
            import http.client, socket, ssl, time
            ctx = ssl.create_default_context(cafile='\(harness.stateDirectory)/ca.pem')
            c = http.client.HTTPSConnection('api.example.test', context=ctx, timeout=10)
            c.sock = ctx.wrap_socket(socket.create_connection(('203.0.113.10', 443)), server_hostname='api.example.test')
            for i, path in enumerate(\(paths)):
                if i: time.sleep(\(gap))
                c.request('GET', path, headers={'Authorization': 'Bearer $MSB_TOKEN'})
                r = c.getresponse()
                assert r.read() == b'ok\\n', path
            print('keep-alive ok')
            EOF
            """)
    }

    @Test func aQuietGuestConnectionGivesItsUpstreamBackAndTakesOneAtItsNextRequest() throws {
        // Taken back from the pool: one upstream connection for both requests.
        let harness = try ProxyHarness()
        defer { harness.close() }
        let log = try harness.upstream("203.0.113.10", port: 443, cert: "api.example.test")
        try harness.startProxy(
            policy: Self.policy, extra: ["--threads", "1", "--upstream-idle-timeout", "30", "--upstream-detach-after", "0.5"])
        let quiet = try keepAliveGuest(harness, paths: ["/one", "/two"], gap: 1.5)
        #expect(quiet.stdout.contains("keep-alive ok"), "\(quiet.stderr)")
        var records = harness.records(log)
        #expect(records.map { $0["target"] as? String } == ["/one", "/two"])
        #expect(Set(records.compactMap { $0["peer"] as? String }).count == 1)
        #expect(counter(harness, "keyhole_upstream_reused_total") == 1)
        // A new guest connection takes the upstream the first one left when it closed.
        let shared = try keepAliveGuest(harness, paths: ["/three"], gap: 0)
        #expect(shared.stdout.contains("keep-alive ok"))
        records = harness.records(log)
        for record in records { #expect(harness.header(record, "Authorization") == "Bearer \(Self.realValue)") }
        #expect(Set(records.compactMap { $0["peer"] as? String }).count == 1)

        // Gone from the pool by then: a new connection, handshaken and verified, and the
        // request still substituted.
        let fresh = try ProxyHarness()
        defer { fresh.close() }
        let freshLog = try fresh.upstream("203.0.113.10", port: 443, cert: "api.example.test")
        try fresh.startProxy(
            policy: Self.policy, extra: ["--threads", "1", "--upstream-idle-timeout", "0.3", "--upstream-detach-after", "0.5"])
        let again = try keepAliveGuest(fresh, paths: ["/a", "/b"], gap: 1.5)
        #expect(again.stdout.contains("keep-alive ok"), "\(again.stderr)")
        let freshRecords = fresh.records(freshLog)
        try #require(freshRecords.count == 2)
        #expect(Set(freshRecords.compactMap { $0["peer"] as? String }).count == 2)
        #expect(fresh.header(freshRecords[1], "Authorization") == "Bearer \(Self.realValue)")
        #expect(counter(fresh, "keyhole_upstream_reused_total") == 0)
    }

    @Test func anUpstreamThatClosesAnIdleConnectionIsNotUsedAgainAndPoolingCanBeTurnedOff() throws {
        let harness = try ProxyHarness()
        defer { harness.close() }
        let log = try harness.upstream("203.0.113.10", port: 443, cert: "api.example.test", extra: ["--keepalive", "1"])
        try harness.startProxy(policy: Self.policy, extra: ["--threads", "1", "--upstream-idle-timeout", "30"])
        #expect(try harness.curl("https://api.example.test/a").stdout == "ok\n")
        Thread.sleep(forTimeInterval: 2)  // the upstream closes the idle connection
        let b = try harness.curl("https://api.example.test/b", "-H 'Authorization: Bearer $MSB_TOKEN'")
        #expect(b.stdout == "ok\n", "\(b.stderr)")
        let records = harness.records(log)
        try #require(records.count == 2)
        #expect(Set(records.compactMap { $0["peer"] as? String }).count == 2)
        #expect(harness.header(records[1], "Authorization") == "Bearer \(Self.realValue)")

        let off = try ProxyHarness()
        defer { off.close() }
        let offLog = try off.upstream("203.0.113.10", port: 443, cert: "api.example.test")
        try off.startProxy(policy: Self.policy, extra: ["--upstream-idle-timeout", "0", "--threads", "1"])
        for path in ["/x", "/y"] { #expect(try off.curl("https://api.example.test" + path).stdout == "ok\n") }
        #expect(Set(off.records(offLog).compactMap { $0["peer"] as? String }).count == 2)
        #expect(counter(off, "keyhole_upstream_reused_total") == 0)
    }
}
