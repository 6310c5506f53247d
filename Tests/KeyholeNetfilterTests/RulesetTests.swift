import KeyholeNetfilter
import KeyholePolicy
import Testing

@Suite("Appliance rules")
struct RulesetTests {
    @Test func theTableReplacesItselfAtomicallyAndCoversTheContract() {
        let rules = ApplianceRules(
            interface: "tap-worker", proxyPort: 15001, queueNumber: 7,
            egress: EgressPolicy(default: .public, allow: [.network(IPNetwork("10.1.0.0/16")!)], deny: [.network(IPNetwork("203.0.113.9/32")!)]))
        let script = rules.nftScript()
        #expect(script.hasPrefix("table inet keyhole_tap_worker\ndelete table inet keyhole_tap_worker\ntable inet keyhole_tap_worker {"))
        #expect(script.contains("iifname \"tap-worker\" meta l4proto tcp redirect to :15001"))
        #expect(script.contains("udp dport 443 drop"))
        #expect(script.contains("meta l4proto tcp drop"))
        #expect(script.contains("ip daddr 203.0.113.9/32 drop"))
        #expect(script.contains("ip daddr 10.1.0.0/16 accept"))
        // deny before allow before the default
        let deny = script.range(of: "203.0.113.9/32 drop")!.lowerBound
        let allow = script.range(of: "10.1.0.0/16 accept")!.lowerBound
        let internalRanges = script.range(of: "ip daddr { 0.0.0.0/8")!.lowerBound
        #expect(deny < allow && allow < internalRanges)
        #expect(script.contains("iifname \"tap-worker\" masquerade"))
        #expect(rules.queueInstallCommands().contains([
            "-t", "mangle", "-A", "KEYHOLE-tap_worker", "-p", "udp", "--sport", "53", "-m", "conntrack", "--ctdir", "REPLY",
            "--ctorigdstport", "53", "-j", "NFQUEUE", "--queue-num", "7",
        ]), "only replies to the guest's own DNS connections are observed")
        // A guest that forges packets from another address (a trusted resolver's) is dropped
        // by the reverse-path check before anything else sees them.
        #expect(script.contains("iifname \"tap-worker\" meta nfproto ipv4 ip saddr != 0.0.0.0 fib saddr . iif oif missing drop"))
        #expect(script.contains("iifname \"tap-worker\" meta nfproto ipv6 ip6 saddr != :: fib saddr . iif oif missing drop"))
        // Deny rules cover the IPv6 forms of a denied IPv4 network.
        #expect(script.contains("ip6 daddr { 64:ff9b::cb00:7109/128, 2002:cb00:7109::/48, ::203.0.113.9/128, ::ffff:0:cb00:7109/128 } drop"))
        #expect(!rules.queueInstallCommands().joined().joined().contains("bypass"), "the queue must fail closed")
    }

    @Test func guestDNSGoesOnlyToTrustedResolvers() {
        let rules = ApplianceRules(
            interface: "t0", proxyPort: 1, queueNumber: 1, egress: EgressPolicy(default: .none),
            resolvers: [IPAddress("198.51.100.53")!, IPAddress("198.51.100.54")!, IPAddress("2001:db8::53")!])
        let script = rules.nftScript()
        #expect(script.contains("ip daddr 198.51.100.53 meta l4proto { tcp, udp } th dport 53 accept"))
        #expect(!script.contains("\n    meta l4proto { tcp, udp } th dport 53 accept"), "no unrestricted DNS")
        #expect(script.contains("    meta l4proto { tcp, udp } th dport 53 drop\n"))
        // A query to any other resolver is sent to a trusted one (the guest cannot pick).
        #expect(script.contains(
            "iifname \"t0\" meta l4proto { tcp, udp } th dport 53 ip daddr != { 198.51.100.53, 198.51.100.54 } dnat ip to 198.51.100.53"))
        #expect(script.contains("th dport 53 ip6 daddr != { 2001:db8::53 } dnat ip6 to [2001:db8::53]"))
        // DNS over TLS is dropped before it could reach the proxy.
        #expect(script.contains("iifname \"t0\" meta l4proto { tcp, udp } th dport 853 drop"))
        let redirect = script.range(of: "dnat ip to")!.lowerBound
        let proxy = script.range(of: "redirect to :1")!.lowerBound
        #expect(redirect < proxy)
        #expect(script.contains("    drop\n"))
    }

    @Test func withoutAnIPv6ResolverIPv6DNSIsDropped() {
        let rules = ApplianceRules(interface: "t0", proxyPort: 1, queueNumber: 1, egress: EgressPolicy(), resolvers: [IPAddress("198.51.100.53")!])
        let script = rules.nftScript()
        #expect(!script.contains("dnat ip6"))
        #expect(script.contains("meta l4proto { tcp, udp } th dport 53 drop"))
    }

    @Test func theApplianceItselfIsOnlyReachableWhereItServesTheGuest() {
        let rules = ApplianceRules(interface: "t0", proxyPort: 15001, queueNumber: 1, egress: EgressPolicy(), resolvers: [IPAddress("10.0.2.1")!])
        let script = rules.nftScript()
        func chain(_ script: String) -> String {
            let start = script.range(of: "chain guest_input {")!.upperBound
            return String(script[start..<script[start...].range(of: "\n  }")!.lowerBound]) + "\n"
        }
        let input = chain(script)
        #expect(input.contains("meta l4proto tcp th dport 15001 accept"))
        #expect(input.contains("ip daddr 10.0.2.1 meta l4proto { tcp, udp } th dport 53 accept"))
        #expect(input.contains("meta l4proto { icmp, ipv6-icmp } accept"))
        #expect(input.hasSuffix("    drop\n"))
        let all = ApplianceRules(interface: "t0", proxyPort: 15001, queueNumber: 1, egress: EgressPolicy(default: .all)).nftScript()
        #expect(chain(all).hasSuffix("    accept\n"))
    }

    @Test func publicCoversTranslatedFormsOfInternalIPv4() {
        let script = ApplianceRules(interface: "t0", proxyPort: 1, queueNumber: 1, egress: EgressPolicy()).nftScript()
        for network in ["::ffff:0:0/96", "64:ff9b::a9fe:0/112", "2002:a9fe::/32", "64:ff9b::a00:0/104", "64:ff9b:1::/48", "fc00::/7"] {
            #expect(script.contains(network), "\(network)")
        }
    }

    @Test func egressHostNamesUseSetsFilledFromDNSAnswers() {
        let rules = ApplianceRules(
            interface: "t0", proxyPort: 1, queueNumber: 1,
            egress: EgressPolicy(default: .none, allow: [.host("pkg.example.test")], deny: [.host("bad.example.test")]))
        let script = rules.nftScript()
        #expect(script.contains("set egress_allow_v4 { type ipv4_addr; flags timeout; }"))
        let deny = script.range(of: "ip daddr @egress_deny_v4 drop")!.lowerBound
        let allow = script.range(of: "ip daddr @egress_allow_v4 accept")!.lowerBound
        #expect(deny < allow)
        #expect(rules.egressHostRule(for: "PKG.example.test.") == true)
        #expect(rules.egressHostRule(for: "bad.example.test") == false)
        #expect(rules.egressHostRule(for: "other.example.test") == nil)
        let elements = rules.egressElementScript(allow: true, addresses: [(IPAddress("203.0.113.5")!, 60), (IPAddress("2001:db8::5")!, 10)])
        #expect(elements == "add element inet keyhole_t0 egress_allow_v4 { 203.0.113.5 timeout 90s }\nadd element inet keyhole_t0 egress_allow_v6 { 2001:db8::5 timeout 40s }\n")
    }

    @Test func interfaceNames() {
        #expect(ApplianceRules.interfaceProblem("tap0") == nil)
        #expect(ApplianceRules.interfaceProblem("a-very-long-interface") != nil)
        #expect(ApplianceRules.interfaceProblem("bad name") != nil)
    }

    @Test func dnsAnswersInsideIPPackets() throws {
        var dns = ResponseBuilder(question: "api.example.test")
        dns.answer(owner: ResponseBuilder.questionPointer, type: 1, ttl: 60, data: [203, 0, 113, 10])
        let udp: [UInt8] = [0, 53, 0x9C, 0x40] + [UInt8((8 + dns.bytes.count) >> 8), UInt8((8 + dns.bytes.count) & 0xFF), 0, 0]
        let total = 20 + udp.count + dns.bytes.count
        let ipv4: [UInt8] = [0x45, 0, UInt8(total >> 8), UInt8(total & 0xFF), 0, 0, 0x40, 0, 64, 17, 0, 0, 198, 51, 100, 53, 10, 0, 2, 2]
        let payload = try DNSPacket.dnsPayload(ipv4 + udp + dns.bytes)
        #expect(payload.destination == IPAddress("10.0.2.2"))
        #expect(try DNSMessage.parseResponse(Array(payload.dns)).addresses.first?.address == IPAddress("203.0.113.10"))
        // A query (destination port 53) is not an answer.
        let query: [UInt8] = [0x9C, 0x40, 0, 53, 0, 8, 0, 0]
        #expect(throws: DNSPacket.Failure.notDNSTransport) { try DNSPacket.dnsPayload(ipv4 + query) }
        #expect(throws: DNSPacket.Failure.notIP) { try DNSPacket.dnsPayload([0x20, 0, 0]) }
    }

    @Test func rebindingNeedsAnInternalAddressThePolicyDoesNotOpen() {
        let policy = DNSAnswerPolicy(egress: EgressPolicy(default: .public, allow: [.network(IPNetwork("10.5.0.0/16")!)]))
        #expect(policy.isRebinding(IPAddress("10.9.9.9")!))
        #expect(policy.isRebinding(IPAddress("127.0.0.1")!))
        #expect(policy.isRebinding(IPAddress("169.254.169.254")!))
        #expect(!policy.isRebinding(IPAddress("10.5.1.1")!))
        #expect(!policy.isRebinding(IPAddress("203.0.113.10")!))
    }
}
