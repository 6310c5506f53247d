import KeyholePolicy
import Testing

/// `network.egress` for every guest flow (proxied TCP included): what the attack lab reached.
@Suite("Egress decisions")
struct EgressDecisionTests {
    let gateway = IPAddress("10.0.2.1")!
    let appliancePublic = IPAddress("198.51.100.1")!

    func denied(_ text: String, _ egress: EgressPolicy = EgressPolicy(), names: [String] = []) -> Bool {
        !egress.decide(IPAddress(text)!, names: names, applianceAddresses: [gateway, appliancePublic]).isAllowed
    }

    @Test(arguments: [
        "169.254.169.254", "192.168.77.7", "10.0.2.1", "127.0.0.1", "100.64.0.1", "172.16.5.5", "224.0.0.251", "0.0.0.0",
        "255.255.255.255", "198.51.100.1",
        // IPv6: loopback, link-local, ULA (AWS's IPv6 metadata is fd00:ec2::254), multicast, unspecified
        "::1", "fe80::1", "fd00:ec2::254", "ff02::1", "::",
        // IPv6 forms of denied IPv4: mapped, NAT64, 6to4, IPv4-compatible, local-use NAT64
        "::ffff:169.254.169.254", "64:ff9b::a9fe:a9fe", "64:ff9b::c0a8:4d07", "2002:a9fe:a9fe::1", "::a9fe:a9fe", "64:ff9b:1::1",
        "::ffff:0:a9fe:a9fe",  // SIIT
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",  // Teredo (the IPv4 inside is obfuscated)
        // Translated forms of the appliance's own public address.
        "64:ff9b::c633:6401", "2002:c633:6401::1",
    ])
    func publicDeniesEveryInternalAddressAndTheApplianceItself(_ address: String) {
        #expect(denied(address), "\(address)")
    }

    @Test(arguments: ["203.0.113.10", "8.8.8.8", "2001:db8::1", "2606:4700::1111", "64:ff9b::808:808", "2002:808:808::1"])
    func publicAllowsPublicAddresses(_ address: String) {
        #expect(!denied(address), "\(address)")
    }

    @Test func denyBeforeAllowBeforeTheDefault() {
        let egress = EgressPolicy(
            default: .public, allow: [.network(IPNetwork("192.168.77.0/24")!), .host("intranet.example.test")],
            deny: [.network(IPNetwork("203.0.113.66/32")!), .host("tracker.example.test")])
        #expect(!denied("192.168.77.7", egress))
        #expect(!denied("64:ff9b::c0a8:4d07", egress), "the NAT64 form of an allowed network is allowed")
        #expect(denied("203.0.113.66", egress))
        #expect(denied("203.0.113.10", egress, names: ["Tracker.Example.Test."]))
        #expect(!denied("10.9.9.9", egress, names: ["intranet.example.test"]))
        #expect(denied("10.9.9.9", egress, names: ["intranet.example.test", "tracker.example.test"]), "deny wins")
        if case .denied(let rule) = egress.decide(IPAddress("169.254.169.254")!) {
            #expect(rule.contains("link"))
        } else {
            Issue.record("metadata allowed")
        }
    }

    @Test func noneAndAll() {
        #expect(denied("203.0.113.10", EgressPolicy(default: .none)))
        #expect(!denied("203.0.113.10", EgressPolicy(default: .none, allow: [.network(IPNetwork("203.0.113.0/24")!)])))
        #expect(!denied("169.254.169.254", EgressPolicy(default: .all)))
        #expect(denied("169.254.169.254", EgressPolicy(default: .all, deny: [.network(IPNetwork("169.254.0.0/16")!)])))
        #expect(EgressPolicy(default: .all, deny: [.host("x.example.test")]).hasHostRules)
        #expect(!EgressPolicy().hasHostRules)
    }
}
