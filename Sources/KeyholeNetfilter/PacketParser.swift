public import KeyholePolicy

/// Finds the DNS message inside a queued IP packet (IPv4 or IPv6; UDP, or TCP carrying one
/// whole length-prefixed message).
public enum DNSPacket {
    public enum Failure: Error, Sendable, Equatable {
        case notIP
        case truncated
        case notDNSTransport
        /// A TCP segment that does not hold one complete DNS message.
        case partialTCPMessage
    }

    /// The DNS payload and the address it is going to (the guest).
    public struct Payload: Sendable, Equatable {
        public var destination: IPAddress
        public var dns: ArraySlice<UInt8>
    }

    public static func dnsPayload(_ packet: [UInt8]) throws(Failure) -> Payload {
        guard let first = packet.first else { throw .truncated }
        var protocolNumber: UInt8
        var offset: Int
        let destination: IPAddress
        switch first >> 4 {
        case 4:
            guard packet.count >= 20 else { throw .truncated }
            let headerLength = Int(first & 0x0F) * 4
            guard headerLength >= 20, packet.count >= headerLength else { throw .truncated }
            // A fragment cannot be parsed alone; DNS answers over UDP are rarely fragmented.
            let fragment = (UInt16(packet[6]) << 8 | UInt16(packet[7])) & 0x3FFF
            guard fragment == 0 else { throw .truncated }
            protocolNumber = packet[9]
            destination = IPAddress(v4Bytes: Array(packet[16..<20]))
            offset = headerLength
        case 6:
            guard packet.count >= 40 else { throw .truncated }
            protocolNumber = packet[6]
            destination = IPAddress(v6Bytes: Array(packet[24..<40]))
            offset = 40
            // Skip the common extension headers (hop-by-hop, routing, destination options).
            while [0, 43, 60].contains(protocolNumber) {
                guard packet.count >= offset + 8 else { throw .truncated }
                protocolNumber = packet[offset]
                offset += (Int(packet[offset + 1]) + 1) * 8
            }
        default:
            throw .notIP
        }
        switch protocolNumber {
        case 17:  // UDP
            guard packet.count >= offset + 8 else { throw .truncated }
            let sourcePort = UInt16(packet[offset]) << 8 | UInt16(packet[offset + 1])
            guard sourcePort == 53 else { throw .notDNSTransport }
            return Payload(destination: destination, dns: packet[(offset + 8)...])
        case 6:  // TCP
            guard packet.count >= offset + 20 else { throw .truncated }
            let sourcePort = UInt16(packet[offset]) << 8 | UInt16(packet[offset + 1])
            guard sourcePort == 53 else { throw .notDNSTransport }
            let dataOffset = Int(packet[offset + 12] >> 4) * 4
            guard dataOffset >= 20, packet.count >= offset + dataOffset else { throw .truncated }
            let data = packet[(offset + dataOffset)...]
            guard data.count >= 2 else { throw .partialTCPMessage }
            let length = Int(data[data.startIndex]) << 8 | Int(data[data.startIndex + 1])
            guard data.count == length + 2 else { throw .partialTCPMessage }
            return Payload(destination: destination, dns: data.dropFirst(2))
        default:
            throw .notDNSTransport
        }
    }
}

/// What to do with a DNS answer before the guest sees it.
public struct DNSAnswerPolicy: Sendable {
    /// Private, loopback and link-local answers are dropped unless one of these allows them.
    public var allowedPrivate: [IPNetwork]

    public init(allowedPrivate: [IPNetwork] = []) {
        self.allowedPrivate = allowedPrivate
    }

    public init(egress: EgressPolicy) {
        var networks: [IPNetwork] = []
        for rule in egress.allow {
            if case .network(let network) = rule { networks.append(network) }
        }
        if egress.default == .all {
            networks += [IPNetwork("0.0.0.0/0")!, IPNetwork("::/0")!]
        }
        self.allowedPrivate = networks
    }

    /// DNS rebinding: an answer that points a name at an internal address the policy does
    /// not open.
    public func isRebinding(_ address: IPAddress) -> Bool {
        switch address.scope {
        case .public, .multicast, .reserved:
            return false
        case .unspecified, .loopback, .private, .sharedAddressSpace, .linkLocal:
            return !allowedPrivate.contains { $0.contains(address) }
        }
    }
}
