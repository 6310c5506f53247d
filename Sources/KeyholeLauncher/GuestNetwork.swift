import Foundation
public import KeyholePolicy
import KeyholeNetfilter

/// The sandbox's TAP device: created for the run, removed at the end; a stale one left by
/// a crashed run under the same name is replaced.
public struct TapDevice: Sendable {
    public let name: String

    public static func create(_ name: String) throws(LauncherError) -> TapDevice {
        if FileManager.default.fileExists(atPath: "/sys/class/net/\(name)") {
            _ = try? HostCommand.run("/usr/sbin/ip", ["link", "del", name])
        }
        do {
            _ = try HostCommand.run("/usr/sbin/ip", ["tuntap", "add", "dev", name, "mode", "tap"])
        } catch {
            throw .network("cannot create TAP \(name): \(error) (is /dev/net/tun available, and are you root?)")
        }
        return TapDevice(name: name)
    }

    public func remove() {
        _ = try? HostCommand.run("/usr/sbin/ip", ["link", "del", name])
    }
}

/// Addressing of the guest's point-to-point link.
public enum GuestAddressing {
    /// The policy's `network.gateway`, or a free /30 from 10.213.0.0/16 chosen from the
    /// sandbox name (stable across runs) and the networks already on this host.
    public static func gateway(for policy: Policy) throws(LauncherError) -> InterfaceAddress {
        if let gateway = policy.network.gateway { return gateway }
        let used = hostNetworks()
        let start = Int(TapName.hash4(policy.name), radix: 16)! % 16384
        for step in 0..<16384 {
            let block = (start + step) % 16384
            let base: UInt32 = 0x0AD5_0000 | UInt32(block * 4)
            let network = IPNetwork("\(IPAddress.v4(base))/30")!
            if used.contains(where: { $0.contains(network.address) || network.contains($0.address) }) { continue }
            return InterfaceAddress("\(IPAddress.v4(base + 1))/30")!
        }
        throw .network("no free /30 left in 10.213.0.0/16; set network.gateway in the policy")
    }

    /// The guest's own address: the gateway's neighbour inside its network.
    public static func guest(for gateway: InterfaceAddress) throws(LauncherError) -> InterfaceAddress {
        guard case .v4(let value) = gateway.address, gateway.prefixLength <= 30 else {
            throw .network("network.gateway \(gateway) must be an IPv4 address with a prefix of /30 or shorter")
        }
        let network = gateway.network
        for candidate in [value &+ 1, value &- 1] where network.contains(.v4(candidate)) {
            let host = candidate & ~(UInt32.max << (32 - UInt32(gateway.prefixLength)))
            let broadcast = ~(UInt32.max << (32 - UInt32(gateway.prefixLength)))
            if host != 0 && host != broadcast { return InterfaceAddress("\(IPAddress.v4(candidate))/\(gateway.prefixLength)")! }
        }
        throw .network("network.gateway \(gateway) leaves no address for the guest")
    }

    /// The resolver the guest is told to use: the first IPv4 one of `trustedResolvers`.
    public static func resolver(for policy: Policy, resolvConf: String = "/etc/resolv.conf") throws(LauncherError) -> IPAddress {
        let trusted = try trustedResolvers(for: policy, resolvConf: resolvConf)
        guard let first = trusted.first(where: \.isIPv4) else {
            throw .network("no IPv4 resolver among \(trusted.map(\.description).joined(separator: ", ")); set network.dns in the policy")
        }
        return first
    }

    /// The resolvers Keyhole trusts for a guest (BRIEF §4 (c)): `network.dns`, else the
    /// host's own non-loopback nameservers (a loopback resolver cannot be reached from the
    /// guest). Guest DNS goes only to these, and only their answers create pins.
    public static func trustedResolvers(for policy: Policy, resolvConf: String = "/etc/resolv.conf") throws(LauncherError) -> [IPAddress] {
        if !policy.network.dns.isEmpty { return policy.network.dns }
        let text = (try? String(contentsOfFile: resolvConf, encoding: .utf8)) ?? ""
        var loopback: String?
        var found: [IPAddress] = []
        for line in text.split(separator: "\n") {
            let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard fields.count >= 2, fields[0] == "nameserver", let address = IPAddress(fields[1]) else { continue }
            if address.scope == .loopback {
                loopback = loopback ?? String(fields[1])
                continue
            }
            if !found.contains(address) { found.append(address) }
        }
        if !found.isEmpty { return found }
        if let loopback {
            throw .network("the host's resolver \(loopback) is on loopback, which the guest cannot reach; set network.dns in the policy")
        }
        throw .network("no nameserver in \(resolvConf); set network.dns in the policy")
    }

    static func hostNetworks() -> [IPNetwork] {
        guard let output = try? HostCommand.run("/usr/sbin/ip", ["-4", "-o", "addr", "show"]) else { return [] }
        var networks: [IPNetwork] = []
        for line in output.split(separator: "\n") {
            let fields = line.split(separator: " ")
            if let index = fields.firstIndex(of: "inet"), index + 1 < fields.count, let address = InterfaceAddress(fields[index + 1]) {
                networks.append(address.network)
            }
        }
        if let routes = try? HostCommand.run("/usr/sbin/ip", ["-4", "route", "show"]) {
            for line in routes.split(separator: "\n") {
                if let first = line.split(separator: " ").first, let network = IPNetwork(first) { networks.append(network) }
            }
        }
        return networks
    }
}
