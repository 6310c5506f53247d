/// Whether the guest may reach an address (BRIEF §4 Egress), decided the way the
/// appliance's nft `guest_egress` chain decides for non-TCP traffic, so proxied TCP and
/// everything else follow one policy: deny rules, then allow rules, then the default.
public enum EgressDecision: Sendable, Hashable {
    case allowed
    /// `rule` names what denied it (a CIDR, a host name, or the default).
    case denied(rule: String)

    public var isAllowed: Bool { self == .allowed }
}

extension EgressPolicy {
    /// Whether host-name rules exist (then the caller has to look up which names the
    /// trusted DNS answers gave for the address).
    public var hasHostRules: Bool {
        (allow + deny).contains { if case .host = $0 { return true } else { return false } }
    }

    /// Decides for `address`.
    /// - Parameters:
    ///   - names: host names whose trusted DNS answers (unexpired) contained `address`.
    ///   - applianceAddresses: the appliance's own addresses, the guest-facing gateway
    ///     among them: `public` denies them like any internal address.
    public func decide(_ address: IPAddress, names: [String] = [], applianceAddresses: Set<IPAddress> = []) -> EgressDecision {
        let address = address.unmapped
        let normalizedNames = Set(names.map { HostName.normalize($0) })
        for rule in deny where Self.rule(rule, covers: address, names: normalizedNames) {
            return .denied(rule: "deny \(rule)")
        }
        for rule in allow where Self.rule(rule, covers: address, names: normalizedNames) {
            return .allowed
        }
        switch self.default {
        case .all:
            return .allowed
        case .none:
            return .denied(rule: "default none")
        case .public:
            if applianceAddresses.contains(address) || address.embeddedIPv4.map(applianceAddresses.contains) == true {
                return .denied(rule: "default public (the appliance's own address)")
            }
            if !address.isPublic { return .denied(rule: "default public (\(address.scope.rawValue) address)") }
            return .allowed
        }
    }

    private static func rule(_ rule: Rule, covers address: IPAddress, names: Set<String>) -> Bool {
        switch rule {
        case .network(let network):
            if network.contains(address) { return true }
            // A translated form of a listed IPv4 network (NAT64, 6to4) is that network too.
            if let embedded = address.embeddedIPv4 { return network.contains(embedded) }
            return false
        case .host(let host):
            return names.contains(HostName.normalize(host))
        }
    }
}
