import Foundation
import Testing

/// The proxy connection as clients meet it (issue: robust, bounded): a first flight larger
/// than one read, a server that speaks first, a declined upgrade, and a flood toward a
/// silent server after an upgrade request. Redirect mode, root only.
@Suite("Connection end to end", .serialized, .enabled(if: isRoot, "needs root for network namespaces"))
struct ConnectionEndToEndTests {
    static let realValue = "conn-real-token-0007"

    static let policy = """
        version: 1
        name: conn
        secrets:
          - env: TOKEN
            value: "\(realValue)"
            allow_hosts: [api.example.test]
            require_tls_identity: false
            inject: { headers: true, body: true }
          - env: OTHER
            value: "conn-other-token-0008"
            allow_hosts: [other.example.test]
            inject: { body: true }
        network:
          on_secret_violation: block-and-log
          upstream_ca: [{{DIR}}/upca.pem]
        """

    func assertNoValueLeaked(_ harness: ProxyHarness) {
        for text in [harness.audit, harness.stderr] {
            #expect(!text.contains(Self.realValue))
            #expect(!text.contains("conn-other-token-0008"))
        }
    }

    /// A WebSocket client in the guest: TLS to api.example.test, the upgrade (offering
    /// permessage-deflate), then each message as one masked text frame; prints the status
    /// line, then "sent" or how the connection ended.
    func webSocket(_ harness: ProxyHarness, messages: [String]) throws -> CLI.Result {
        let list = messages.map { "'" + $0 + "'" }.joined(separator: ", ")
        return try harness.guest(
            """
            python3 - <<'EOF'
            import os, socket, ssl, time
            ctx = ssl.create_default_context(cafile='\(harness.stateDirectory)/ca.pem')
            s = ctx.wrap_socket(socket.create_connection(('203.0.113.10', 443), timeout=8), server_hostname='api.example.test')
            s.sendall(b'GET /socket HTTP/1.1\\r\\nHost: api.example.test\\r\\nUpgrade: websocket\\r\\nConnection: Upgrade\\r\\n'
                      b'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\\r\\nSec-WebSocket-Version: 13\\r\\n'
                      b'Sec-WebSocket-Extensions: permessage-deflate\\r\\n\\r\\n')
            head = b''
            while b'\\r\\n\\r\\n' not in head:
                head += s.recv(1024)
            print(head.split(b'\\r\\n')[0].decode())
            try:
                for text in [\(list)]:
                    payload = text.encode()
                    key = os.urandom(4)
                    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
                    s.sendall(bytes([0x81, 0x80 | len(payload)]) + key + masked)
                    time.sleep(0.3)
                s.sendall(bytes([0x88, 0x80]) + os.urandom(4))
                s.settimeout(2)
                print('sent', s.recv(100))
            except (ConnectionResetError, ssl.SSLError, BrokenPipeError) as error:
                print('reset', type(error).__name__)
            except socket.timeout:
                print('sent')
            EOF
            """)
    }

    @Test func aWebSocketMessageIsReadSubstitutedOrRefused() throws {
        let harness = try ProxyHarness()
        defer { harness.close() }
        let log = try harness.upstream("203.0.113.10", port: 443, cert: "api.example.test")
        try harness.startProxy(policy: Self.policy)
        let ok = try webSocket(harness, messages: ["{\"auth\":\"$MSB_TOKEN\"}", "plain message"])
        #expect(ok.stdout.hasPrefix("HTTP/1.1 101"), "\(ok.stdout)\(ok.stderr)\n\(harness.audit)")
        let records = harness.records(log)
        #expect(records.compactMap { $0["ws"] as? String }.prefix(2) == ["{\"auth\":\"\(Self.realValue)\"}", "plain message"], "\(records)")
        // The offer reached the server without an extension Keyhole could not read.
        #expect(harness.header(records.first ?? [:], "Sec-WebSocket-Extensions") == nil)
        #expect(harness.audit.contains("\"site\":\"websocket-message\""), "\(harness.audit)")

        // Another secret's placeholder in a message to this host: a violation, never sent.
        let before = harness.records(log).count
        let refused = try webSocket(harness, messages: ["first", "steal $MSB_OTHER"])
        #expect(refused.stdout.contains("reset"), "\(refused.stdout)\(refused.stderr)")
        let after = harness.records(log).dropFirst(before).compactMap { $0["ws"] as? String }
        #expect(after == ["first"], "\(after)")
        #expect(harness.audit.contains("\"event\":\"violation\""), "\(harness.audit)")
        assertNoValueLeaked(harness)
    }

    @Test func aPlainHTTPFirstFlightLargerThanOneReadArrivesWhole() throws {
        let harness = try ProxyHarness()
        defer { harness.close() }
        let log = try harness.upstream("203.0.113.10", port: 80, cert: nil)
        try harness.startProxy(policy: Self.policy)
        // A 6 KiB cookie and a 3 KiB body with a placeholder near its end: one first flight.
        let cookie = String(repeating: "c", count: 6 * 1024)
        let body = String(repeating: "b", count: 3 * 1024 - 20) + "&token=$MSB_TOKEN"
        try body.write(toFile: harness.directory + "/body.txt", atomically: true, encoding: .utf8)
        let result = try harness.guest(
            "curl -sS --max-time 5 --resolve api.example.test:80:203.0.113.10 -H 'Cookie: k=\(cookie)' "
                + "-H 'Content-Type: text/plain' --data-binary @\(harness.directory)/body.txt http://api.example.test/upload")
        #expect(result.status == 0, "\(result.stderr)\n\(harness.audit)")
        let record = try #require(harness.records(log).first)
        #expect(harness.header(record, "Cookie") == "k=" + cookie)
        let received = record["body"] as? String ?? ""
        #expect(received == body.replacingOccurrences(of: "$MSB_TOKEN", with: Self.realValue))
        assertNoValueLeaked(harness)
    }

    @Test func aServerThatSpeaksFirstIsHeardAtOnce() throws {
        let harness = try ProxyHarness()
        defer { harness.close() }
        try harness.listener("203.0.113.10", port: 7000, extra: ["--banner", "220 mail.example.test ESMTP"])
        // A first-flight timeout far longer than the banner may take to arrive.
        try harness.startProxy(policy: Self.policy, extra: ["--first-flight-timeout", "5"])
        let probe = try harness.guest(
            """
            python3 - <<'EOF'
            import socket, time
            s = socket.create_connection(('203.0.113.10', 7000), timeout=10)
            start = time.monotonic()
            banner = s.recv(100)
            print('%.3f %s' % (time.monotonic() - start, banner.decode().strip()))
            EOF
            """)
        let fields = probe.stdout.split(separator: " ", maxSplits: 1)
        let seconds = Double(fields.first ?? "") ?? 99
        #expect(fields.last?.hasPrefix("220 mail.example.test") == true, "\(probe.stdout)\(probe.stderr)")
        #expect(seconds < 2, "the banner took \(seconds) s (the first-flight timeout is 5 s)")
    }

    @Test func aDeclinedUpgradeLeavesTheConnectionHTTP() throws {
        let harness = try ProxyHarness()
        defer { harness.close() }
        let log = try harness.upstream("203.0.113.10", port: 443, cert: "api.example.test")
        try harness.startProxy(policy: Self.policy)
        // `Upgrade: h2c` answered with an ordinary 200 (the lab: the connection became a
        // relay and the next request's placeholder was blocked as a violation).
        let h2c = "GET /h2c HTTP/1.1\r\nHost: api.example.test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
        let next = "GET /after HTTP/1.1\r\nHost: api.example.test\r\nAuthorization: Bearer $MSB_TOKEN\r\n\r\n"
        let result = try harness.exchange(ip: "203.0.113.10", port: 443, sni: "api.example.test", requests: [h2c, next])
        let lines = result.stdout.split(separator: "\n")
        #expect(lines.count == 2 && lines.allSatisfy { $0.hasPrefix("response HTTP/1.1 200") }, "\(result.stdout)\(result.stderr)\n\(harness.audit)")
        let records = harness.records(log)
        #expect(records.compactMap { $0["target"] as? String } == ["/h2c", "/after"])
        #expect(harness.header(records.last ?? [:], "Authorization") == "Bearer \(Self.realValue)")
        #expect(!harness.audit.contains("\"event\":\"violation\""), "\(harness.audit)")
        // A 200 to `Upgrade: foo` does not switch off the Host checks either (the second lab:
        // any 2xx counted as an upgrade, and a fronted request followed unchecked).
        let foo = "GET /up HTTP/1.1\r\nHost: api.example.test\r\nConnection: Upgrade\r\nUpgrade: foo\r\n\r\n"
        let fronted = "GET /fronted HTTP/1.1\r\nHost: other.example.test\r\n\r\n"
        let again = try harness.exchange(ip: "203.0.113.10", port: 443, sni: "api.example.test", requests: [foo, fronted])
        #expect(again.stdout.hasPrefix("response HTTP/1.1 200"), "\(again.stdout)")
        #expect(!again.stdout.contains("response HTTP/1.1 200 OK ok\nresponse"), "\(again.stdout)")
        #expect(!harness.records(log).contains { $0["target"] as? String == "/fronted" })
        #expect(harness.audit.contains("\"event\":\"host-mismatch\""), "\(harness.audit)")
        assertNoValueLeaked(harness)
    }

    @Test func aFloodAfterAnUpgradeRequestToASilentServerStaysBounded() throws {
        let harness = try ProxyHarness()
        defer { harness.close() }
        let silent = try harness.listener("203.0.113.10", port: 7000, extra: ["--silent"])
        try harness.startProxy(policy: Self.policy)
        let pid = try #require(try harness.proxyPID())
        // The guest asks for an upgrade, then sends as fast as it can for 4 s: the proxy
        // stops reading while the answer is pending, so the guest's sends stall.
        let flood = try harness.guest(
            """
            python3 - <<'EOF'
            import socket, time
            s = socket.create_connection(('203.0.113.10', 7000), timeout=10)
            s.sendall(b'GET /ws HTTP/1.1\\r\\nHost: api.example.test:7000\\r\\nUpgrade: websocket\\r\\nConnection: Upgrade\\r\\n\\r\\n')
            s.settimeout(0.5)
            chunk = b'x' * (1 << 20)
            sent = 0
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline and sent < (512 << 20):
                try:
                    sent += s.send(chunk)
                except socket.timeout:
                    pass
            print(sent)
            EOF
            """, timeout: 30)
        let sent = Int(flood.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) ?? -1
        #expect(sent >= 0, "\(flood.stderr)")
        #expect(sent < 32 << 20, "the guest could push \(sent >> 20) MiB toward a silent server")
        let status = try String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)
        let rss = status.split(separator: "\n").first { $0.hasPrefix("VmHWM:") }
        let kilobytes = Int(rss?.split(whereSeparator: \.isWhitespace).dropFirst().first ?? "") ?? Int.max
        #expect(kilobytes < 150 * 1024, "proxy peak RSS \(kilobytes) KiB")
        _ = silent
    }

    @Test func anUpstreamThatNeverCompletesItsHandshakeDoesNotHoldTheGuest() throws {
        let harness = try ProxyHarness()
        defer { harness.close() }
        // Accepts the connection, reads the ClientHello, never answers.
        let silent = try harness.listener("203.0.113.10", port: 443, extra: ["--silent"])
        try harness.startProxy(policy: Self.policy)
        let start = Date()
        let result = try harness.curl("https://api.example.test/never", "--max-time 30")
        let seconds = Date().timeIntervalSince(start)
        #expect(result.status != 0)
        #expect(seconds < 20, "the guest waited \(seconds) s (the connect timeout is 10 s)")
        #expect(harness.audit.contains("\"event\":\"upstream-setup-timeout\""), "\(harness.audit)")
        _ = silent
    }
}
