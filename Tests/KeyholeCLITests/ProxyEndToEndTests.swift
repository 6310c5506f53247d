import Foundation
import Testing

/// The proxy with real clients (curl, Python) in a network namespace whose TCP is REDIRECTed
/// to it by nft, and real TLS upstreams whose certificates come from a test CA that the
/// policy lists as `upstream_ca`. Root only; CI runs as root.
@Suite("Proxy end to end", .serialized, .enabled(if: isRoot, "needs root for network namespaces"))
struct ProxyEndToEndTests {
    static let realValue = "e2e-real-token-0001"
    static let otherValue = "e2e-other-value-0002"

    static let policy = """
        version: 1
        name: e2e
        secrets:
          - env: TOKEN
            value: "\(realValue)"
            allow_hosts: [api.example.test]
            inject: { headers: true, basic_auth: true, query: true, body: true }
          - env: OTHER
            value: "\(otherValue)"
            allow_hosts: [other.example.test]
        network:
          on_secret_violation: block-and-log
          upstream_ca: [{{DIR}}/upca.pem]
          tls_bypass: [pinned.example.test]
        """

    /// Every configured real value, for the "grep finds nothing" checks.
    static let values = [realValue, otherValue]

    func assertNoValueLeaked(_ harness: ProxyHarness, _ extra: [String] = []) throws {
        let metrics = (try? harness.metricsText()) ?? ""
        for text in [harness.audit, harness.stderr, metrics] + extra {
            for value in Self.values {
                #expect(!text.contains(value), "a real value appeared in proxy output")
            }
        }
    }

    @Test func substitutesInEverySiteForCurlAndPython() throws {
        let harness = try ProxyHarness()
        defer { harness.close() }
        let log = try harness.upstream("203.0.113.10", port: 443, cert: "api.example.test")
        try harness.startProxy(policy: Self.policy)

        // Header, with curl.
        let header = try harness.curl("https://api.example.test/user", "-H 'Authorization: Bearer $MSB_TOKEN'")
        #expect(header.status == 0, "\(header.stderr)")
        #expect(header.stdout == "ok\n")
        // Basic auth: curl builds base64(ci:$MSB_TOKEN) itself.
        let basic = try harness.curl("https://api.example.test/v2/", "-u 'ci:$MSB_TOKEN'")
        #expect(basic.status == 0, "\(basic.stderr)")
        // Query, raw and percent-encoded.
        let query = try harness.curl("https://api.example.test/maps?key=$MSB_TOKEN&k2=%24MSB_TOKEN")
        #expect(query.status == 0, "\(query.stderr)")
        // Content-Length body and chunked body, with Python's http.client.
        let python = try harness.guest(
            """
            python3 - <<'EOF'
            import http.client, socket, ssl
            ctx = ssl.create_default_context(cafile='\(harness.stateDirectory)/ca.pem')
            def conn():
                c = http.client.HTTPSConnection('api.example.test', context=ctx, timeout=10)
                c.sock = ctx.wrap_socket(socket.create_connection(('203.0.113.10', 443)), server_hostname='api.example.test')
                return c
            c = conn()
            c.request('POST', '/json', body='{"token":"$MSB_TOKEN"}', headers={'Content-Type': 'application/json'})
            assert c.getresponse().read() == b'ok\\n'
            c.request('POST', '/chunked', body=iter([b'part-one $MS', b'B_TOKEN part-two']), headers={'Transfer-Encoding': 'chunked'}, encode_chunked=True)
            assert c.getresponse().read() == b'ok\\n'
            print('python ok')
            EOF
            """)
        #expect(python.stdout.contains("python ok"), "\(python.stderr)")

        let records = harness.records(log)
        try #require(records.count == 5, "\(python.stderr)")
        #expect(records.map { $0["target"] as? String } == ["/user", "/v2/", "/maps?key=\(Self.realValue)&k2=\(Self.realValue)", "/json", "/chunked"])
        #expect(harness.header(records[0], "Authorization") == "Bearer \(Self.realValue)")
        let basicValue = Data(("ci:" + Self.realValue).utf8).base64EncodedString()
        #expect(harness.header(records[1], "Authorization") == "Basic \(basicValue)")
        #expect(records[3]["body"] as? String == "{\"token\":\"\(Self.realValue)\"}")
        #expect(harness.header(records[3], "Content-Length") == String("{\"token\":\"\(Self.realValue)\"}".utf8.count))
        #expect(records[4]["body"] as? String == "part-one \(Self.realValue) part-two")
        #expect(harness.audit.contains("\"event\":\"substituted\""))
        let metrics = try harness.metricsText()
        #expect(metrics.contains("keyhole_requests_total 5"), "\(metrics)")
        #expect(metrics.contains("keyhole_connections_total{kind=\"tls\"} 4"))
        #expect(metrics.contains("keyhole_substitutions_total{secret=\"TOKEN\",site=\"body\"} 2"))
        #expect(metrics.contains("keyhole_leaf_cache_hits_total 3"))
        #expect(metrics.contains("keyhole_leaf_cache_misses_total 1"))
        try assertNoValueLeaked(harness, [header.stdout, header.stderr, python.stdout, python.stderr])
    }

    /// A keep-alive connection's substitutions reuse the audit line of the last one when
    /// secret, site and request repeat (`Session.auditSubstitution`): each line must still
    /// name its own request, and change as soon as any of them does.
    @Test func eachSubstitutionOnAKeepAliveConnectionIsAuditedWithItsOwnRequest() throws {
        let harness = try ProxyHarness()
        defer { harness.close() }
        _ = try harness.upstream("203.0.113.10", port: 443, cert: "api.example.test")
        try harness.startProxy(policy: Self.policy)
        let python = try harness.guest(
            """
            python3 - <<'EOF'
            import http.client, socket, ssl
            ctx = ssl.create_default_context(cafile='\(harness.stateDirectory)/ca.pem')
            c = http.client.HTTPSConnection('api.example.test', context=ctx, timeout=10)
            c.sock = ctx.wrap_socket(socket.create_connection(('203.0.113.10', 443)), server_hostname='api.example.test')
            for method, target, headers in [
                ('GET', '/a', {'Authorization': 'Bearer $MSB_TOKEN'}),
                ('GET', '/a', {'Authorization': 'Bearer $MSB_TOKEN'}),
                ('GET', '/b', {'Authorization': 'Bearer $MSB_TOKEN'}),
                ('GET', '/b?key=$MSB_TOKEN', {}),
                ('DELETE', '/b', {'Authorization': 'Bearer $MSB_TOKEN'}),
                ('GET', '/' + 'p' * 600, {'Authorization': 'Bearer $MSB_TOKEN'}),
                ('GET', '/' + 'p' * 600, {'Authorization': 'Bearer $MSB_TOKEN'}),
                ('GET', '/a', {'Authorization': 'Bearer $MSB_TOKEN'}),
            ]:
                c.request(method, target, headers=headers)
                assert c.getresponse().read() == b'ok\\n'
            print('python ok')
            EOF
            """)
        #expect(python.stdout.contains("python ok"), "\(python.stderr)")
        var substituted: [[String: Any]] = []
        for _ in 0..<50 {
            substituted = harness.records(harness.auditLog).filter { $0["event"] as? String == "substituted" }
            if substituted.count >= 8 { break }
            Thread.sleep(forTimeInterval: 0.1)
        }
        try #require(substituted.count == 8, "\(harness.audit)")
        // A line longer than the session keeps (a 601-byte path) is made anew each time.
        let long = "/" + String(repeating: "p", count: 600)
        #expect(substituted.map { "\($0["method"] ?? "-") \($0["path"] ?? "-") \($0["site"] ?? "-")" } == [
            "GET /a header", "GET /a header", "GET /b header", "GET /b query", "DELETE /b header",
            "GET \(long) header", "GET \(long) header", "GET /a header",
        ])
        #expect(Set(substituted.compactMap { $0["connection"] as? Int }).count == 1, "one connection")
        for record in substituted {
            #expect(record["host"] as? String == "api.example.test" && record["sni"] as? String == "api.example.test")
            #expect(record["secret"] as? String == "TOKEN" && record["sandbox"] as? String == "e2e" && record["level"] as? String == "info")
        }
        try assertNoValueLeaked(harness)
    }

    @Test func theGuestSeesAValidChainFromTheSandboxCAForAnyName() throws {
        let harness = try ProxyHarness()
        defer { harness.close() }
        try harness.upstream("203.0.113.11", port: 443, cert: "other.example.test")
        try harness.startProxy(policy: Self.policy, pins: [])
        // No pin, no placeholder: an ordinary request to a name the guest looked up itself.
        let result = try harness.curl("https://other.example.test/", ip: "203.0.113.11", "-w ' %{ssl_verify_result}'")
        #expect(result.status == 0, "\(result.stderr)")
        #expect(result.stdout == "ok\n 0")
        let issuer = try harness.guest(
            "echo | openssl s_client -connect 203.0.113.11:443 -servername other.example.test -CAfile \(harness.stateDirectory)/ca.pem 2>/dev/null | openssl x509 -noout -issuer -ext subjectAltName")
        #expect(issuer.stdout.contains("Keyhole sandbox CA"))
        #expect(issuer.stdout.contains("DNS:other.example.test"))
    }

    @Test func aDisallowedHostGetsAResetAndAnAuditEvent() throws {
        let harness = try ProxyHarness()
        defer { harness.close() }
        let log = try harness.upstream("203.0.113.11", port: 443, cert: "other.example.test")
        try harness.startProxy(policy: Self.policy, pins: ["other.example.test=203.0.113.11"])
        let result = try harness.curl(
            "https://other.example.test/collect", ip: "203.0.113.11", "-H 'X-Leak: $MSB_TOKEN'")
        #expect(result.status == 56, "curl should see a reset: \(result.stderr)")
        #expect(result.stderr.contains("reset"))
        #expect(harness.records(log).isEmpty, "nothing of the request may reach the upstream")
        #expect(harness.audit.contains("\"event\":\"violation\""))
        #expect(harness.audit.contains("\"reason\":\"host-not-allowed\""))
        #expect(harness.audit.contains("\"level\":\"warn\""))
        try assertNoValueLeaked(harness)
    }

    @Test func sniNotEqualToHostIsAViolation() throws {
        let harness = try ProxyHarness()
        defer { harness.close() }
        let log = try harness.upstream("203.0.113.10", port: 443, cert: "api.example.test")
        try harness.startProxy(policy: Self.policy)
        let result = try harness.curl("https://api.example.test/f", "-H 'Host: other.example.test' -H 'Authorization: Bearer $MSB_TOKEN'")
        #expect(result.status == 56)
        #expect(harness.records(log).isEmpty)
        #expect(harness.audit.contains("\"reason\":\"host-header-mismatch\""))
        try assertNoValueLeaked(harness)
    }

    @Test func anUpstreamWithABadCertificateNeverSeesTheValue() throws {
        let harness = try ProxyHarness()
        defer { harness.close() }
        // Right name, but signed by nobody the policy trusts.
        let log = try harness.upstream("203.0.113.10", port: 443, cert: "selfsigned")
        try harness.startProxy(policy: Self.policy)
        let result = try harness.curl("https://api.example.test/x", "-H 'Authorization: Bearer $MSB_TOKEN'")
        #expect(result.status != 0)
        #expect(harness.records(log).isEmpty)
        #expect(harness.audit.contains("\"event\":\"upstream-tls-failed\""))
        let metrics = try harness.metricsText()
        #expect(metrics.contains("keyhole_upstream_verify_failures_total 1"))
        try assertNoValueLeaked(harness)
    }

    @Test func plainHTTPWithTLSIdentityRequiredIsNotSubstituted() throws {
        let harness = try ProxyHarness()
        defer { harness.close() }
        let log = try harness.upstream("203.0.113.10", port: 80, cert: nil)
        try harness.startProxy(policy: Self.policy)
        let result = try harness.guest(
            "curl -sS --max-time 10 --resolve api.example.test:80:203.0.113.10 -H 'Authorization: Bearer $MSB_TOKEN' http://api.example.test/plain")
        #expect(result.status == 56)
        #expect(harness.records(log).isEmpty)
        #expect(harness.audit.contains("\"reason\":\"tls-identity-required\""))
        // Plain HTTP without a placeholder passes.
        let clean = try harness.guest("curl -sS --max-time 10 --resolve api.example.test:80:203.0.113.10 http://api.example.test/clean")
        #expect(clean.stdout == "ok\n")
        try assertNoValueLeaked(harness)
    }

    @Test func aPlaceholderOnANonHTTPFlowIsAViolation() throws {
        let harness = try ProxyHarness()
        defer { harness.close() }
        try harness.upstream("203.0.113.12", port: 7000, cert: nil)
        try harness.startProxy(policy: Self.policy)
        let result = try harness.guest(
            """
            python3 - <<'EOF'
            import socket
            s = socket.create_connection(('203.0.113.12', 7000), timeout=5)
            s.sendall(b'\\x00\\x01binary-protocol token=$MSB_TOKEN\\n')
            try:
                print('read', s.recv(100))
            except ConnectionResetError:
                print('reset')
            EOF
            """)
        #expect(result.stdout.contains("reset"), "\(result.stdout)\(result.stderr)")
        #expect(harness.audit.contains("\"site\":\"opaque-stream\""))
        try assertNoValueLeaked(harness)
    }

    @Test func tlsBypassHostsAreRelayedUntouched() throws {
        let harness = try ProxyHarness()
        defer { harness.close() }
        let log = try harness.upstream("203.0.113.13", port: 443, cert: "pinned.example.test")
        try harness.startProxy(policy: Self.policy)
        // The guest sees the upstream's own certificate: it verifies against the upstream CA,
        // not the sandbox CA.
        let result = try harness.guest(
            "curl -sS --max-time 10 --cacert \(harness.directory)/upca.pem --resolve pinned.example.test:443:203.0.113.13 -H 'X: $MSB_TOKEN' https://pinned.example.test/p")
        #expect(result.status == 0, "\(result.stderr)")
        #expect(harness.header(harness.records(log).first ?? [:], "X") == "$MSB_TOKEN")
        let metrics = try harness.metricsText()
        #expect(metrics.contains("keyhole_connections_total{kind=\"tls-bypass\"} 1"))
        try assertNoValueLeaked(harness)
    }

    @Test func aRequestHeadThatDripsInIsCutOff() throws {
        let harness = try ProxyHarness()
        defer { harness.close() }
        let log = try harness.upstream("203.0.113.10", port: 80, cert: nil)
        try harness.startProxy(policy: Self.policy, extra: ["--head-timeout", "1"])
        let result = try harness.guest(
            """
            python3 - <<'EOF'
            import socket, time
            s = socket.create_connection(('203.0.113.10', 80), timeout=10)
            start = time.time()
            try:
                s.sendall(b'GET / HTTP/1.1\\r\\nHost: api.example.test\\r\\n')
                for i in range(8):
                    time.sleep(0.5)
                    s.sendall(b'X-Slow: ' + str(i).encode() + b'\\r\\n')
                print('still open', s.recv(10))
            except (ConnectionResetError, BrokenPipeError):
                print('reset after %.1f s' % (time.time() - start))
            EOF
            """)
        #expect(result.stdout.contains("reset after"), "\(result.stdout)\(result.stderr)")
        #expect(harness.audit.contains("\"event\":\"slow-request-head\""))
        #expect(harness.records(log).isEmpty)
    }

    @Test func aConnectionQuietForTheIdleTimeoutIsResetAndABusyOneIsNot() throws {
        let harness = try ProxyHarness()
        defer { harness.close() }
        let log = try harness.upstream("203.0.113.10", port: 80, cert: nil)
        try harness.startProxy(policy: Self.policy, extra: ["--idle-timeout", "1"])
        // Two keep-alive connections at once: one asks every 0.4 s for 3 s (more than the
        // timeout in all, never quiet for it), the other asks once and then waits.
        let result = try harness.guest(
            """
            python3 - <<'EOF'
            import http.client, ssl, threading, time
            \(ProxyHarness.watchQuietPython)
            def busy():
                c = http.client.HTTPConnection('203.0.113.10', 80, timeout=10)
                for i in range(8):
                    c.request('GET', '/busy%d' % i, headers={'Host': 'api.example.test'})
                    assert c.getresponse().read() == b'ok\\n'
                    time.sleep(0.4)
                print('busy ok')
            t = threading.Thread(target=busy); t.start()
            c = http.client.HTTPConnection('203.0.113.10', 80, timeout=10)
            c.request('GET', '/quiet', headers={'Host': 'api.example.test'})
            assert c.getresponse().read() == b'ok\\n'
            watch_quiet(lambda: c.sock.recv(10))
            t.join()
            EOF
            """)
        #expect(result.stdout.contains("busy ok"), "\(result.stdout)\(result.stderr)")
        let seconds = ProxyHarness.secondsUntilQuietClosed(result.stdout)
        #expect(seconds.map { $0 >= 0.8 && $0 < 3 } == true, "\(result.stdout)")
        #expect(harness.records(log).count == 9)
    }

    @Test func blockAndTerminateStopsTheProxyWithStatusFour() throws {
        let harness = try ProxyHarness()
        defer { harness.close() }
        try harness.upstream("203.0.113.11", port: 443, cert: "other.example.test")
        try harness.startProxy(
            policy: Self.policy.replacingOccurrences(of: "block-and-log", with: "block-and-terminate"),
            pins: ["other.example.test=203.0.113.11"])
        _ = try harness.curl("https://other.example.test/", ip: "203.0.113.11", "-H 'X: $MSB_TOKEN'")
        #expect(harness.waitForProxyExit(seconds: 10) == 4)
        #expect(harness.audit.contains("\"level\":\"error\""))
        #expect(harness.stderr.contains("block-and-terminate: secret TOKEN"))
        try assertNoValueLeaked(harness)
    }

    @Test func aLargeUploadToASlowReaderKeepsMemoryBounded() throws {
        let harness = try ProxyHarness()
        defer { harness.close() }
        let log = try harness.upstream("203.0.113.10", port: 443, cert: "api.example.test", extra: ["--discard", "--slow", "1"])
        // Body substitution off: the body streams (with it on, a body over the 64 MiB hold
        // limit is refused, never sent with a wrong length).
        try harness.startProxy(policy: Self.policy.replacingOccurrences(of: "query: true, body: true", with: "query: true, body: false"))
        let pid = try #require(try harness.proxyPID())
        let size = 1 << 30
        // A sparse 1 GiB file: curl streams it with a Content-Length.
        let file = harness.directory + "/big.bin"
        try harness.sh("truncate -s \(size) \(file)")
        let upload = try harness.guest(
            "curl -sS --max-time 240 --cacert \(harness.stateDirectory)/ca.pem --resolve api.example.test:443:203.0.113.10 -H 'Expect:' -T \(file) https://api.example.test/upload",
            timeout: 250)
        #expect(upload.status == 0, "\(upload.stderr)")
        #expect(harness.records(log).first?["body_length"] as? Int == size)
        let status = try String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)
        let peak = status.split(separator: "\n").first { $0.hasPrefix("VmHWM:") }
        let kilobytes = Int(peak?.split(whereSeparator: \.isWhitespace).dropFirst().first ?? "") ?? Int.max
        #expect(kilobytes < 200 * 1024, "proxy peak RSS \(kilobytes) KiB for a 1 GiB upload")
    }
}
