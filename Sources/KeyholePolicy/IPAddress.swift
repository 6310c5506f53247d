#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// An IPv4 or IPv6 address as a value.
public enum IPAddress: Sendable, Hashable, CustomStringConvertible {
    case v4(UInt32)
    /// Network byte order, 16 bytes.
    case v6(high: UInt64, low: UInt64)

    public init?<S: StringProtocol>(_ text: S) {
        let string = String(text)
        // A byte test: `contains(":")` would go through Foundation's string search.
        if string.utf8.contains(UInt8(ascii: ":")) {
            var addr = in6_addr()
            guard inet_pton(AF_INET6, string, &addr) == 1 else { return nil }
            let bytes = withUnsafeBytes(of: &addr) { Array($0) }
            self.init(v6Bytes: bytes)
        } else {
            // inet_pton accepts only the strict dotted quad, which is what we want.
            var addr = in_addr()
            guard inet_pton(AF_INET, string, &addr) == 1 else { return nil }
            self = .v4(UInt32(bigEndian: addr.s_addr))
        }
    }

    public init(v6Bytes bytes: [UInt8]) {
        precondition(bytes.count == 16)
        var high: UInt64 = 0
        var low: UInt64 = 0
        for i in 0..<8 { high = high << 8 | UInt64(bytes[i]) }
        for i in 8..<16 { low = low << 8 | UInt64(bytes[i]) }
        self = .v6(high: high, low: low)
    }

    public init(v4Bytes bytes: [UInt8]) {
        precondition(bytes.count == 4)
        self = .v4(UInt32(bytes[0]) << 24 | UInt32(bytes[1]) << 16 | UInt32(bytes[2]) << 8 | UInt32(bytes[3]))
    }

    public var isIPv4: Bool {
        if case .v4 = self { return true }
        return false
    }

    /// Network-order bytes (4 or 16).
    public var bytes: [UInt8] {
        switch self {
        case .v4(let value):
            return [UInt8(value >> 24), UInt8(value >> 16 & 0xFF), UInt8(value >> 8 & 0xFF), UInt8(value & 0xFF)]
        case .v6(let high, let low):
            return (0..<8).map { UInt8(high >> (56 - 8 * UInt64($0)) & 0xFF) }
                + (0..<8).map { UInt8(low >> (56 - 8 * UInt64($0)) & 0xFF) }
        }
    }

    /// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) as its IPv4 form; others unchanged.
    public var unmapped: IPAddress {
        if case .v6(let high, let low) = self, high == 0, low >> 32 == 0xFFFF {
            return .v4(UInt32(truncatingIfNeeded: low))
        }
        return self
    }

    public var description: String {
        switch self {
        case .v4:
            return bytes.map(String.init).joined(separator: ".")
        case .v6:
            var addr = in6_addr()
            let raw = bytes
            withUnsafeMutableBytes(of: &addr) { $0.copyBytes(from: raw) }
            var buffer = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
            guard inet_ntop(AF_INET6, &addr, &buffer, socklen_t(buffer.count)) != nil else { return "?" }
            return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        }
    }

    /// What kind of destination an address is, for egress defaults and DNS rebinding checks.
    public enum Scope: String, Sendable, Hashable {
        case unspecified, loopback, `private`, sharedAddressSpace, linkLocal, multicast, reserved, `public`
    }

    public var scope: Scope {
        let address = unmapped
        for (network, scope) in IPAddress.specialNetworks where network.contains(address) {
            return scope
        }
        // An IPv6 form that carries an IPv4 address (NAT64, 6to4, IPv4-compatible) is
        // what that IPv4 address is: `64:ff9b::a9fe:a9fe` reaches 169.254.169.254.
        if let embedded = address.embeddedIPv4 { return embedded.scope }
        return .public
    }

    /// The IPv4 address inside an IPv6 address that translators route to it: the
    /// well-known NAT64 prefix `64:ff9b::/96`, SIIT `::ffff:0:0/96`, 6to4 `2002::/16`, and
    /// the deprecated IPv4-compatible `::a.b.c.d`. (IPv4-mapped addresses are `unmapped`.)
    public var embeddedIPv4: IPAddress? {
        guard case .v6(let high, let low) = self else { return nil }
        if high == 0x0064_FF9B_0000_0000, low >> 32 == 0 { return .v4(UInt32(truncatingIfNeeded: low)) }
        // IPv4-translated (SIIT, RFC 2765): ::ffff:0:a.b.c.d
        if high == 0, low >> 32 == 0xFFFF_0000 { return .v4(UInt32(truncatingIfNeeded: low)) }
        if high >> 48 == 0x2002 { return .v4(UInt32(truncatingIfNeeded: high >> 16)) }
        if high == 0, low >> 32 == 0, low > 1 { return .v4(UInt32(truncatingIfNeeded: low)) }
        return nil
    }

    /// Public means: not loopback, private (RFC 1918, ULA), CGNAT, link-local (which holds the
    /// cloud metadata address 169.254.169.254), multicast or reserved. Documentation ranges
    /// (TEST-NET) count as public: they are not anyone's internal network.
    public var isPublic: Bool { scope == .public }

    static let specialNetworks: [(IPNetwork, Scope)] = ([
        ("0.0.0.0/8", .unspecified), ("10.0.0.0/8", .private), ("100.64.0.0/10", .sharedAddressSpace),
        ("127.0.0.0/8", .loopback), ("169.254.0.0/16", .linkLocal), ("172.16.0.0/12", .private),
        ("192.0.0.0/24", .reserved), ("192.168.0.0/16", .private), ("198.18.0.0/15", .reserved),
        ("224.0.0.0/4", .multicast), ("240.0.0.0/4", .reserved),
        ("::/128", .unspecified), ("::1/128", .loopback), ("fc00::/7", .private), ("fe80::/10", .linkLocal),
        ("ff00::/8", .multicast), ("100::/64", .reserved),
        // Local-use NAT64 (RFC 8215): its embedding is the operator's choice, so it is never public.
        ("64:ff9b:1::/48", .reserved),
        // Teredo: the IPv4 address inside is obfuscated, so it is never public either.
        ("2001::/32", .reserved),
    ] as [(String, Scope)]).map { (IPNetwork($0.0)!, $0.1) }
}

/// A CIDR block such as `10.0.0.0/8` or `fd00::/8`.
public struct IPNetwork: Sendable, Hashable, CustomStringConvertible {
    public let address: IPAddress
    public let prefixLength: Int

    /// Parses `ADDR/LEN`, or a bare address as a host route. Host bits must be zero.
    public init?<S: StringProtocol>(_ text: S) {
        let parts = text.split(separator: "/", maxSplits: 1, omittingEmptySubsequences: false)
        guard let address = IPAddress(parts[0]) else { return nil }
        let maxLength = address.isIPv4 ? 32 : 128
        var length = maxLength
        if parts.count == 2 {
            guard let parsed = Int(parts[1]), parsed >= 0, parsed <= maxLength, !parts[1].hasPrefix("+") else {
                return nil
            }
            length = parsed
        }
        guard IPNetwork.masked(address, length) == address else { return nil }
        self.address = address
        self.prefixLength = length
    }

    public func contains(_ candidate: IPAddress) -> Bool {
        let candidate = address.isIPv4 ? candidate.unmapped : candidate
        guard candidate.isIPv4 == address.isIPv4 else { return false }
        return IPNetwork.masked(candidate, prefixLength) == address
    }

    static func masked(_ address: IPAddress, _ length: Int) -> IPAddress {
        switch address {
        case .v4(let value):
            let mask: UInt32 = length == 0 ? 0 : ~UInt32(0) << (32 - length)
            return .v4(value & mask)
        case .v6(let high, let low):
            let highMask: UInt64 = length >= 64 ? ~0 : (length == 0 ? 0 : ~UInt64(0) << (64 - length))
            let lowLength = max(0, length - 64)
            let lowMask: UInt64 = lowLength >= 64 ? ~0 : (lowLength == 0 ? 0 : ~UInt64(0) << (64 - lowLength))
            return .v6(high: high & highMask, low: low & lowMask)
        }
    }

    public var description: String { "\(address)/\(prefixLength)" }
}

/// An address with its prefix, as put on an interface (`10.0.2.1/30`).
public struct InterfaceAddress: Sendable, Hashable, CustomStringConvertible {
    public let address: IPAddress
    public let prefixLength: Int

    public init?<S: StringProtocol>(_ text: S) {
        let parts = text.split(separator: "/", maxSplits: 1, omittingEmptySubsequences: false)
        guard parts.count == 2, let address = IPAddress(parts[0]), let length = Int(parts[1]),
            !parts[1].hasPrefix("+"), length >= 1, length <= (address.isIPv4 ? 32 : 128)
        else { return nil }
        self.address = address
        self.prefixLength = length
    }

    public var network: IPNetwork {
        IPNetwork("\(IPNetwork.masked(address, prefixLength))/\(prefixLength)")!
    }

    public var description: String { "\(address)/\(prefixLength)" }
}
