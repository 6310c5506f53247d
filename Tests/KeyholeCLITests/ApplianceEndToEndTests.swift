import Foundation
import Testing

/// `keyhole proxy --interface` as a drop-in appliance: a guest namespace attached by veth to
/// the appliance namespace, which routes to an "internet" namespace with dnsmasq and real
/// TLS servers. The guest resolves names through the appliance (its answers pass NFQUEUE).
@Suite("Appliance end to end", .serialized, .enabled(if: isRoot, "needs root for network namespaces"))
struct ApplianceEndToEndTests {
    static let realValue = "appliance-real-token-0003"

    static let policy = """
        version: 1
        name: appliance
        secrets:
          - env: TOKEN
            value: "\(realValue)"
            allow_hosts: [api.example.test]
        network:
          gateway: 10.0.2.1/30
          on_secret_violation: block-and-log
          upstream_ca: [{{DIR}}/upca.pem]
        """

    func curl(_ harness: ProxyHarness, _ url: String, _ options: String = "") throws -> CLI.Result {
        try harness.guestCurl(url, options)
    }

    @Test func resolvedNamesGetTheirSecretAndEverythingElseIsGuarded() throws {
        let harness = try ProxyHarness(mode: .appliance)
        defer { harness.close() }
        let log = try harness.upstream("203.0.113.10", port: 443, cert: "api.example.test")
        let unpinnedLog = try harness.upstream("203.0.113.12", port: 443, cert: "api.example.test")
        let before = try harness.appliance("nft list ruleset; iptables-nft-save | grep -v '^#'; ip6tables-nft-save | grep -v '^#'").stdout
        try harness.startProxy(policy: Self.policy)

        // The guest resolves the name through the appliance and gets its secret substituted.
        let ok = try curl(harness, "https://api.example.test/resolved", "-H 'Authorization: Bearer $MSB_TOKEN'")
        #expect(ok.stdout == "ok\n", "\(ok.stderr)")
        #expect(harness.header(harness.records(log).first ?? [:], "Authorization") == "Bearer \(Self.realValue)")

        // Right SNI, but an address no DNS answer gave for it: no substitution, violation.
        let unpinned = try curl(
            harness, "https://api.example.test/unpinned", "--resolve api.example.test:443:203.0.113.12 -H 'Authorization: Bearer $MSB_TOKEN'")
        #expect(unpinned.status == 56)
        #expect(harness.records(unpinnedLog).isEmpty)
        #expect(harness.audit.contains("\"reason\":\"dns-not-pinned\""))

        // A public name rebound to a private address: the answer never reaches the guest.
        let rebind = try harness.guest("getent hosts rebind.example.test")
        #expect(rebind.status != 0)
        #expect(harness.audit.contains("\"event\":\"dns-rebinding-dropped\""))

        let metrics = try harness.metricsText()
        // Counters exist from the start at 0; these must have moved. Each carries the
        // interface's sandbox and interface name.
        let labels = "sandbox=\"appliance\",interface=\"\(harness.guestInterface)\""
        for result in ["pinned", "dropped-rebinding"] {
            #expect(metrics.contains("keyhole_dns_answers_total{\(labels),result=\"\(result)\"}"), "\(metrics)")
            #expect(!metrics.contains("keyhole_dns_answers_total{\(labels),result=\"\(result)\"} 0\n"), "\(metrics)")
        }
        #expect(metrics.contains("keyhole_connections_total{\(labels),kind=\"tls\"}"), "\(metrics)")

        // Egress for non-TCP traffic: the "internet" is reachable, a private range is not.
        #expect(try harness.guest("ping -c 1 -W 2 203.0.113.10").status == 0)
        #expect(try harness.guest("ping -c 1 -W 2 192.168.77.7").status != 0)
        // QUIC is dropped; plain TCP goes through the proxy (which relays it).
        let quic = try harness.guest("python3 -c \"import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1); s.sendto(b'x', ('203.0.113.10', 443)); print('sent')\"")
        #expect(quic.status == 0)

        // SIGTERM removes every rule: the ruleset is byte-identical to before.
        try harness.sh("kill -TERM \(try #require(try harness.proxyPID()))")
        #expect(harness.waitForProxyExit(seconds: 10) == 0)
        let after = try harness.appliance("nft list ruleset; iptables-nft-save | grep -v '^#'; ip6tables-nft-save | grep -v '^#'").stdout
        #expect(after == before)
        for text in [harness.audit, harness.stderr, ok.stderr] { #expect(!text.contains(Self.realValue)) }
    }

    @Test func killNineFailsClosedAndARestartRecovers() throws {
        let harness = try ProxyHarness(mode: .appliance)
        defer { harness.close() }
        try harness.upstream("203.0.113.10", port: 443, cert: "api.example.test")
        let before = try harness.appliance("nft list ruleset; iptables-nft-save | grep -v '^#'; ip6tables-nft-save | grep -v '^#'").stdout
        try harness.startProxy(policy: Self.policy)
        #expect(try curl(harness, "https://api.example.test/first").stdout == "ok\n")
        try harness.sh("kill -9 \(try #require(try harness.proxyPID()))")
        _ = harness.waitForProxyExit(seconds: 5)
        // Neither DNS (the queue has no listener) nor TCP (the redirect has no listener) gets out.
        let dead = try curl(harness, "https://api.example.test/dead", "--max-time 4")
        #expect(dead.status != 0)
        let direct = try curl(harness, "https://api.example.test/dead", "--max-time 4 --resolve api.example.test:443:203.0.113.10")
        #expect(direct.status != 0)
        // A restart replaces the stale rules and works again.
        try harness.startProxy(policy: Self.policy)
        #expect(try curl(harness, "https://api.example.test/again").stdout == "ok\n")
        let tables = try harness.appliance("nft list tables").stdout
        #expect(tables.components(separatedBy: "keyhole_").count == 2, "exactly one keyhole table: \(tables)")
        // SIGTERM after the restart removes everything, what the crashed run created too
        // (the mangle tables iptables-nft made for its queue chain).
        try harness.sh("kill -TERM \(try #require(try harness.proxyPID()))")
        #expect(harness.waitForProxyExit(seconds: 10) == 0)
        let after = try harness.appliance("nft list ruleset; iptables-nft-save | grep -v '^#'; ip6tables-nft-save | grep -v '^#'").stdout
        #expect(after == before)
    }

    @Test func sighupReloadsTheAllowList() throws {
        let harness = try ProxyHarness(mode: .appliance)
        defer { harness.close() }
        let log = try harness.upstream("203.0.113.11", port: 443, cert: "other.example.test")
        try harness.startProxy(policy: Self.policy)
        // Two connections, so that every event loop has compiled the policy's secrets.
        for attempt in 0..<2 {
            let before = try curl(harness, "https://other.example.test/before\(attempt)", "-H 'X: $MSB_TOKEN'")
            #expect(before.status == 56)
        }
        // The reload widens the allow list and rotates the value: new connections get the
        // new value, never the one compiled before.
        let rotated = "appliance-rotated-token-0009"
        try harness.writePolicy(
            Self.policy.replacingOccurrences(of: "allow_hosts: [api.example.test]", with: "allow_hosts: [api.example.test, other.example.test]")
                .replacingOccurrences(of: Self.realValue, with: rotated))
        try harness.sh("kill -HUP \(try #require(try harness.proxyPID()))")
        try harness.waitFor(file: harness.proxyStderr, containing: "reloaded")
        for attempt in 0..<2 {
            let after = try curl(harness, "https://other.example.test/after\(attempt)", "-H 'X: $MSB_TOKEN'")
            #expect(after.stdout == "ok\n", "\(after.stderr)")
        }
        #expect(harness.records(log).map { harness.header($0, "X") } == [rotated, rotated])
        // An invalid policy is refused and the running one stays.
        try harness.writePolicy("version: 1\nsecrets: [{ env: BROKEN }]\n")
        try harness.sh("kill -HUP \(try #require(try harness.proxyPID()))")
        try harness.waitFor(file: harness.proxyStderr, containing: "kept the running policy")
        #expect(try curl(harness, "https://other.example.test/still", "-H 'X: $MSB_TOKEN'").stdout == "ok\n")
    }

    @Test func oneProcessGuardsTwoInterfacesEachWithItsOwnPolicy() throws {
        let harness = try ProxyHarness(mode: .appliance)
        defer { harness.close() }
        let apiLog = try harness.upstream("203.0.113.10", port: 443, cert: "api.example.test")
        let otherLog = try harness.upstream("203.0.113.11", port: 443, cert: "other.example.test")
        let second = try harness.addGuest()
        let secondPolicy = harness.directory + "/policy2.yaml"
        try """
            version: 1
            name: second
            secrets:
              - env: OTHER
                value: "second-real-token-0004"
                allow_hosts: [other.example.test]
            network:
              gateway: 10.0.3.1/30
              on_secret_violation: block-and-log
              upstream_ca: [\(harness.directory)/upca.pem]
            """.write(toFile: secondPolicy, atomically: true, encoding: .utf8)
        try harness.startProxy(policy: Self.policy, extra: ["--interface", second.interface, "--policy", secondPolicy])
        try harness.waitFor(file: harness.proxyStderr, containing: "guarding \(second.interface) for sandbox second")
        // The placeholders go to stdout once every interface is up (after the stderr line above).
        try harness.waitFor(file: harness.proxyStdout, containing: "OTHER=$MSB_OTHER")
        let placeholders = try String(contentsOfFile: harness.proxyStdout, encoding: .utf8)
        #expect(placeholders.contains("TOKEN=$MSB_TOKEN") && placeholders.contains("OTHER=$MSB_OTHER"))

        func secondGuest(_ url: String, _ header: String) throws -> CLI.Result {
            try harness.run(
                "timeout 30 ip netns exec \(second.namespace) curl -sS --max-time 8 --cacert \(harness.stateDirectory)/ca.pem -H '\(header)' '\(url)'")
        }
        // Each guest gets its own secret at its own allowed host.
        let first = try curl(harness, "https://api.example.test/first", "-H 'Authorization: Bearer $MSB_TOKEN'")
        #expect(first.stdout == "ok\n", "\(first.stderr)")
        let ok = try secondGuest("https://other.example.test/second", "Authorization: Bearer $MSB_OTHER")
        #expect(ok.stdout == "ok\n", "\(ok.stderr)")
        #expect(harness.header(harness.records(otherLog).last ?? [:], "Authorization") == "Bearer second-real-token-0004")
        // The second guest's secret may not go to the first guest's host ...
        let blocked = try secondGuest("https://api.example.test/steal", "Authorization: Bearer $MSB_OTHER")
        #expect(blocked.status == 56)
        // ... and the first guest's placeholder means nothing on the second interface.
        let foreign = try secondGuest("https://other.example.test/foreign", "X: $MSB_TOKEN")
        #expect(foreign.stdout == "ok\n", "\(foreign.stderr)")
        #expect(harness.header(harness.records(otherLog).last ?? [:], "X") == "$MSB_TOKEN")
        let apiPaths = harness.records(apiLog).compactMap { $0["target"] as? String }
        #expect(apiPaths == ["/first"])
        #expect(harness.header(harness.records(apiLog).first ?? [:], "Authorization") == "Bearer \(Self.realValue)")

        // SIGTERM removes both tables.
        try harness.sh("kill -TERM \(try #require(try harness.proxyPID()))")
        #expect(harness.waitForProxyExit(seconds: 10) == 0)
        let tables = try harness.appliance("nft list tables").stdout
        #expect(!tables.contains("keyhole_"), "\(tables)")
    }

    @Test func egressHostRulesFollowTheGuestsDNSAnswers() throws {
        let harness = try ProxyHarness(mode: .appliance)
        defer { harness.close() }
        try harness.startProxy(
            policy: Self.policy.replacingOccurrences(
                of: "  on_secret_violation: block-and-log",
                with: "  on_secret_violation: block-and-log\n  egress: { default: none, allow: [api.example.test], deny: [other.example.test] }"))
        // default none: nothing but DNS until the allowed name has been resolved.
        #expect(try harness.guest("ping -c 1 -W 2 203.0.113.10").status != 0)
        #expect(try harness.guest("getent hosts api.example.test").stdout.contains("203.0.113.10"))
        #expect(try harness.guest("ping -c 1 -W 2 203.0.113.10").status == 0)
        // A resolved name that is not allowed stays closed; a denied one too.
        #expect(try harness.guest("getent hosts other.example.test").stdout.contains("203.0.113.11"))
        #expect(try harness.guest("ping -c 1 -W 2 203.0.113.11").status != 0)
        let sets = try harness.appliance("nft list set inet keyhole_\(harness.guestInterface.replacingOccurrences(of: "-", with: "_")) egress_deny_v4").stdout
        #expect(sets.contains("203.0.113.11"), "\(sets)")
    }

    @Test func ipv6GuestsGetTheSameIdentityChecks() throws {
        let harness = try ProxyHarness(mode: .appliance)
        defer { harness.close() }
        let log = try harness.upstream("2001:db8:113::10", port: 443, cert: "v6.example.test")
        let unresolved = try harness.upstream("2001:db8:113::11", port: 443, cert: "v6.example.test")
        try harness.startProxy(policy: Self.policy.replacingOccurrences(of: "allow_hosts: [api.example.test]", with: "allow_hosts: [v6.example.test]"))
        // Resolved through the appliance (AAAA), REDIRECTed over IPv6, substituted.
        let ok = try curl(harness, "https://v6.example.test/v6", "-6 -H 'Authorization: Bearer $MSB_TOKEN'")
        #expect(ok.stdout == "ok\n", "\(ok.stderr)")
        #expect(harness.header(harness.records(log).first ?? [:], "Authorization") == "Bearer \(Self.realValue)")
        // The right name, but an IPv6 address no DNS answer gave: no substitution, blocked.
        let pinned = try curl(
            harness, "https://v6.example.test/unresolved", "-6 --resolve 'v6.example.test:443:[2001:db8:113::11]' -H 'Authorization: Bearer $MSB_TOKEN'")
        #expect(pinned.status == 56, "\(pinned.stdout) \(pinned.stderr)")
        #expect(harness.records(unresolved).isEmpty)
        #expect(!(try String(contentsOfFile: harness.auditLog, encoding: .utf8)).contains(Self.realValue))
    }
}
