public import KeyholePolicy

/// Keyhole's netfilter rules for one guest-facing interface (BRIEF §1): one nft table
/// (`inet keyhole_<iface>`) for redirection, egress and masquerade, plus an iptables-nft
/// mangle chain for the DNS answer queue (this kernel's nft lacks a native `queue`; the
/// xt NFQUEUE target through nft_compat does the job).
public struct ApplianceRules: Sendable, Equatable {
    public var interface: String
    public var proxyPort: UInt16
    public var queueNumber: UInt16
    public var egress: EgressPolicy
    /// The resolvers Keyhole trusts (`network.dns`, else the host's): guest DNS reaches
    /// only these, and only their answers create pins. Empty: the guest has no DNS.
    public var resolvers: [IPAddress]

    public init(interface: String, proxyPort: UInt16, queueNumber: UInt16, egress: EgressPolicy, resolvers: [IPAddress] = []) {
        self.interface = interface
        self.proxyPort = proxyPort
        self.queueNumber = queueNumber
        self.egress = egress
        self.resolvers = resolvers
    }

    /// Interface names are at most 15 of `[A-Za-z0-9._-]`; nft and iptables names derive from them.
    public static func interfaceProblem(_ name: String) -> String? {
        if name.isEmpty || name.utf8.count > 15 { return "must be 1 to 15 characters" }
        let ok = name.utf8.allSatisfy { b in
            (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A) || b == 0x2D || b == 0x5F || b == 0x2E
        }
        return ok ? nil : "may contain only letters, digits, '-', '_' and '.'"
    }

    var suffix: String {
        String(interface.map { $0.isLetter || $0.isNumber ? $0 : "_" })
    }

    public var tableName: String { "keyhole_" + suffix }
    public var queueChain: String { "KEYHOLE-" + suffix }

    /// Networks that are not "public" (BRIEF §4: private, loopback, link-local, metadata…).
    static let internalV4 = ["0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
                             "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4", "240.0.0.0/4"]
    /// The IPv6 ones, plus the IPv6 forms that translators route to an internal IPv4
    /// address: IPv4-mapped, NAT64 (`64:ff9b::/96`) and 6to4 (`2002::/16`) of each range
    /// above, and local-use NAT64.
    static let internalV6: [String] = {
        var networks = [
            "::/128", "::1/128", "fc00::/7", "fe80::/10", "ff00::/8", "100::/64", "::ffff:0:0/96", "64:ff9b:1::/48", "2001::/32",
        ]
        for text in internalV4 { networks += translatedForms(of: IPNetwork(text)!) }
        return networks
    }()

    /// The IPv6 networks through which translators reach an IPv4 network: NAT64
    /// (`64:ff9b::/96`), SIIT (`::ffff:0:0:0/96`), 6to4 (`2002::/16`) and IPv4-compatible
    /// (`::a.b.c.d`).
    static func translatedForms(of network: IPNetwork) -> [String] {
        let v4 = network.address.bytes
        let zeros = { (count: Int) in [UInt8](repeating: 0, count: count) }
        let nat64 = IPAddress(v6Bytes: [0, 0x64, 0xFF, 0x9B] + zeros(8) + v4)
        let sixToFour = IPAddress(v6Bytes: [0x20, 0x02] + v4 + zeros(10))
        let compatible = IPAddress(v6Bytes: zeros(12) + v4)
        let translated = IPAddress(v6Bytes: zeros(8) + [0xFF, 0xFF, 0, 0] + v4)
        return [
            "\(nat64)/\(96 + network.prefixLength)", "\(sixToFour)/\(16 + network.prefixLength)",
            "\(compatible)/\(96 + network.prefixLength)", "\(translated)/\(96 + network.prefixLength)",
        ]
    }

    static func family(_ network: IPNetwork) -> String { network.address.isIPv4 ? "ip" : "ip6" }
    static func family(_ address: IPAddress) -> String { address.isIPv4 ? "ip" : "ip6" }

    /// An nft script that replaces any earlier copy of the table in one transaction.
    public func nftScript() -> String {
        let iface = "\"\(interface)\""
        var denyNetworks: [String] = []
        var allowNetworks: [String] = []
        for rule in egress.deny {
            guard case .network(let network) = rule else { continue }
            denyNetworks.append("\(Self.family(network)) daddr \(network) drop")
            if network.address.isIPv4 {
                denyNetworks.append("ip6 daddr { \(Self.translatedForms(of: network).joined(separator: ", ")) } drop")
            }
        }
        for rule in egress.allow {
            if case .network(let network) = rule { allowNetworks.append("\(Self.family(network)) daddr \(network) accept") }
        }
        // Host names: the addresses the guest's DNS answers gave for them (sets filled by
        // the DNS observer, each element expiring with its answer's TTL).
        var egressRules = denyNetworks + ["ip daddr @\(Self.denySet4) drop", "ip6 daddr @\(Self.denySet6) drop"]
        egressRules += allowNetworks + ["ip daddr @\(Self.allowSet4) accept", "ip6 daddr @\(Self.allowSet6) accept"]
        switch egress.default {
        case .public:
            egressRules.append("ip daddr { \(Self.internalV4.joined(separator: ", ")) } drop")
            egressRules.append("ip6 daddr { \(Self.internalV6.joined(separator: ", ")) } drop")
            egressRules.append("accept")
        case .none:
            egressRules.append("drop")
        case .all:
            egressRules.append("accept")
        }
        // DNS goes only to the trusted resolvers: a query to any other address is sent to
        // the first trusted resolver of its family (the guest cannot pick its resolver, and
        // only answers Keyhole can trust create pins); DNS over TLS is dropped.
        var dnsRedirects: [String] = []
        for family in ["ip", "ip6"] {
            let trusted = resolvers.filter { Self.family($0) == family }
            guard let first = trusted.first else { continue }
            let list = trusted.map(\.description).joined(separator: ", ")
            let target = first.isIPv4 ? first.description : "[\(first)]"
            dnsRedirects.append("iifname \(iface) meta l4proto { tcp, udp } th dport 53 \(family) daddr != { \(list) } dnat \(family) to \(target)")
        }
        let dnsAccepts = resolvers.map { "\(Self.family($0)) daddr \($0) meta l4proto { tcp, udp } th dport 53 accept" }
        // Traffic to the appliance itself (the gateway and its other addresses): the proxy
        // port (where every guest TCP flow is redirected), ICMP (neighbour discovery, ping)
        // and trusted DNS; everything else only as the egress rules allow.
        var inputRules = ["ct state established,related accept", "meta l4proto tcp th dport \(proxyPort) accept",
                          "meta l4proto { icmp, ipv6-icmp } accept"] + dnsAccepts + denyNetworks + allowNetworks
        inputRules.append(egress.default == .all ? "accept" : "drop")
        return """
            table inet \(tableName)
            delete table inet \(tableName)
            table inet \(tableName) {
              set \(Self.denySet4) { type ipv4_addr; flags timeout; }
              set \(Self.denySet6) { type ipv6_addr; flags timeout; }
              set \(Self.allowSet4) { type ipv4_addr; flags timeout; }
              set \(Self.allowSet6) { type ipv6_addr; flags timeout; }
              chain prefilter {
                type filter hook prerouting priority dstnat - 10; policy accept;
                iifname \(iface) meta nfproto ipv4 ip saddr != 0.0.0.0 fib saddr . iif oif missing drop
                iifname \(iface) meta nfproto ipv6 ip6 saddr != :: fib saddr . iif oif missing drop
                iifname \(iface) meta l4proto { tcp, udp } th dport 853 drop
              }
              chain prerouting {
                type nat hook prerouting priority dstnat; policy accept;
            \(dnsRedirects.map { "    " + $0 }.joined(separator: "\n"))
                iifname \(iface) tcp dport 53 return
                iifname \(iface) meta l4proto tcp redirect to :\(proxyPort)
              }
              chain input {
                type filter hook input priority filter; policy accept;
                iifname \(iface) jump guest_input
              }
              chain guest_input {
            \(inputRules.map { "    " + $0 }.joined(separator: "\n"))
              }
              chain forward {
                type filter hook forward priority filter; policy accept;
                oifname \(iface) ct state established,related accept
                iifname \(iface) jump guest_egress
              }
              chain guest_egress {
                udp dport 443 drop
            \(dnsAccepts.map { "    " + $0 }.joined(separator: "\n"))
                meta l4proto { tcp, udp } th dport 53 drop
                meta l4proto tcp drop
            \(egressRules.map { "    " + $0 }.joined(separator: "\n"))
              }
              chain postrouting {
                type nat hook postrouting priority srcnat; policy accept;
                iifname \(iface) masquerade
              }
            }

            """
    }

    static let denySet4 = "egress_deny_v4", denySet6 = "egress_deny_v6"
    static let allowSet4 = "egress_allow_v4", allowSet6 = "egress_allow_v6"

    /// Whether `name` (normalized) is one of the egress host rules: `true` allow, `false`
    /// deny (deny wins), nil neither.
    public func egressHostRule(for name: String) -> Bool? {
        let name = HostName.normalize(name)
        if egress.deny.contains(.host(name)) { return false }
        if egress.allow.contains(.host(name)) { return true }
        return nil
    }

    /// An nft script adding observed addresses of an egress host to its set until `ttl` ends.
    public func egressElementScript(allow: Bool, addresses: [(IPAddress, UInt32)], graceSeconds: UInt32 = 30) -> String {
        var script = ""
        for (address, ttl) in addresses {
            let set = allow ? (address.isIPv4 ? Self.allowSet4 : Self.allowSet6) : (address.isIPv4 ? Self.denySet4 : Self.denySet6)
            let seconds = min(UInt64(ttl) + UInt64(graceSeconds), 86_400)
            script += "add element inet \(tableName) \(set) { \(address) timeout \(seconds)s }\n"
        }
        return script
    }

    public var nftRemoveScript: String { "delete table inet \(tableName)\n" }

    /// Replaces the table with one that drops every packet from the interface, in both the
    /// input and forward paths (block-and-terminate on a guest Keyhole did not launch).
    public func quarantineScript() -> String {
        let iface = "\"\(interface)\""
        return """
            table inet \(tableName)
            delete table inet \(tableName)
            table inet \(tableName) {
              chain input {
                type filter hook input priority filter - 10; policy accept;
                iifname \(iface) drop
              }
              chain forward {
                type filter hook forward priority filter - 10; policy accept;
                iifname \(iface) drop
                oifname \(iface) drop
              }
            }

            """
    }

    /// iptables-nft commands (arguments after the binary) that queue DNS answers to the guest.
    public func queueInstallCommands() -> [[String]] {
        var commands: [[String]] = [["-t", "mangle", "-N", queueChain]]
        // Only replies of connections the guest opened to port 53: a packet the guest itself
        // forges with source port 53 (and sends back to itself through the appliance) is
        // an original-direction packet and never reaches the observer.
        for proto in ["udp", "tcp"] {
            commands.append([
                "-t", "mangle", "-A", queueChain, "-p", proto, "--sport", "53", "-m", "conntrack", "--ctdir", "REPLY",
                "--ctorigdstport", "53", "-j", "NFQUEUE", "--queue-num", String(queueNumber),
            ])
        }
        commands.append(["-t", "mangle", "-A", "FORWARD", "-o", interface, "-j", queueChain])
        commands.append(["-t", "mangle", "-A", "OUTPUT", "-o", interface, "-j", queueChain])
        return commands
    }

    /// Commands that undo `queueInstallCommands` (errors ignored: parts may be missing).
    public func queueRemoveCommands() -> [[String]] {
        [
            ["-t", "mangle", "-D", "FORWARD", "-o", interface, "-j", queueChain],
            ["-t", "mangle", "-D", "OUTPUT", "-o", interface, "-j", queueChain],
            ["-t", "mangle", "-F", queueChain],
            ["-t", "mangle", "-X", queueChain],
        ]
    }
}
