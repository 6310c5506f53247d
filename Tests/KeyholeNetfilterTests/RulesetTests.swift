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
        #expect(rules.queueInstallCommands().contains(["-t", "mangle", "-A", "KEYHOLE-tap_worker", "-p", "udp", "--sport", "53", "-j", "NFQUEUE", "--queue-num", "7"]))
        #expect(!rules.queueInstallCommands().joined().joined().contains("bypass"), "the queue must fail closed")
    }

    @Test func resolversRestrictDNS() {
        let rules = ApplianceRules(interface: "t0", proxyPort: 1, queueNumber: 1, egress: EgressPolicy(default: .none), resolvers: [IPAddress("198.51.100.53")!])
        let script = rules.nftScript()
        #expect(script.contains("ip daddr 198.51.100.53 meta l4proto { tcp, udp } th dport 53 accept"))
        #expect(!script.contains("\n    meta l4proto { tcp, udp } th dport 53 accept"), "no unrestricted DNS")
        #expect(script.contains("    drop\n"))
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
