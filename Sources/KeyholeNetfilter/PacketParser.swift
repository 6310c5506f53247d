public import KeyholePolicy

/// Finds the DNS data inside a queued IP packet (IPv4 or IPv6; UDP, or a TCP segment whose
/// messages `TCPDNSStreams` puts together).
public enum DNSPacket {
    public enum Failure: Error, Sendable, Equatable {
        case notIP
        case truncated
        case notDNSTransport
    }

    /// What a TCP segment says about its place in the stream.
    public struct TCPSegment: Sendable, Equatable {
        public var sourcePort: UInt16
        public var destinationPort: UInt16
        public var sequence: UInt32
        public var syn: Bool
        /// FIN or RST: the stream ends.
        public var ends: Bool
    }

    /// The DNS data, the address it comes from (the resolver, before any NAT undoes a
    /// redirect) and the address it is going to (the guest). For UDP `dns` is one message;
    /// for TCP it is the segment's payload (length-prefixed messages, or part of one).
    public struct Payload: Sendable, Equatable {
        public var source: IPAddress
        public var destination: IPAddress
        public var dns: ArraySlice<UInt8>
        /// nil for UDP.
        public var tcp: TCPSegment?
    }

    public static func dnsPayload(_ packet: [UInt8]) throws(Failure) -> Payload {
        guard let first = packet.first else { throw .truncated }
        var protocolNumber: UInt8
        var offset: Int
        let destination: IPAddress
        let source: IPAddress
        switch first >> 4 {
        case 4:
            guard packet.count >= 20 else { throw .truncated }
            let headerLength = Int(first & 0x0F) * 4
            guard headerLength >= 20, packet.count >= headerLength else { throw .truncated }
            // A fragment cannot be parsed alone; DNS answers over UDP are rarely fragmented.
            let fragment = (UInt16(packet[6]) << 8 | UInt16(packet[7])) & 0x3FFF
            guard fragment == 0 else { throw .truncated }
            protocolNumber = packet[9]
            source = IPAddress(v4Bytes: Array(packet[12..<16]))
            destination = IPAddress(v4Bytes: Array(packet[16..<20]))
            offset = headerLength
        case 6:
            guard packet.count >= 40 else { throw .truncated }
            protocolNumber = packet[6]
            source = IPAddress(v6Bytes: Array(packet[8..<24]))
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
            return Payload(source: source, destination: destination, dns: packet[(offset + 8)...])
        case 6:  // TCP
            guard packet.count >= offset + 20 else { throw .truncated }
            let sourcePort = UInt16(packet[offset]) << 8 | UInt16(packet[offset + 1])
            guard sourcePort == 53 else { throw .notDNSTransport }
            let destinationPort = UInt16(packet[offset + 2]) << 8 | UInt16(packet[offset + 3])
            var sequence: UInt32 = 0
            for k in 4..<8 { sequence = sequence << 8 | UInt32(packet[offset + k]) }
            let flags = packet[offset + 13]
            let dataOffset = Int(packet[offset + 12] >> 4) * 4
            guard dataOffset >= 20, packet.count >= offset + dataOffset else { throw .truncated }
            let segment = TCPSegment(
                sourcePort: sourcePort, destinationPort: destinationPort, sequence: sequence, syn: flags & 0x02 != 0,
                ends: flags & 0x05 != 0)
            return Payload(source: source, destination: destination, dns: packet[(offset + dataOffset)...], tcp: segment)
        default:
            throw .notDNSTransport
        }
    }
}

/// Where DNS messages begin in the resolvers' TCP streams, so that only a whole message that
/// starts at a message boundary is read. The guest picks the segment sizes of the answers
/// it receives (MSS, window): a segment that merely *looks* like a length-prefixed message
/// (a forged answer inside a TXT record, cut out by the segmentation) must pin nothing.
///
/// The stream's first boundary comes from the SYN-ACK. A segment that starts at the
/// expected boundary and holds exactly one message is read, and the boundary moves past
/// it; a segment anywhere else is not read; a segment at the boundary that holds a partial
/// message or several ends reading for that stream (its answers pass, pinning nothing).
/// Bounded: the oldest streams are forgotten first.
public struct TCPDNSStreams: Sendable {
    struct Key: Hashable {
        var resolver: IPAddress
        var client: IPAddress
        var clientPort: UInt16
    }

    public let capacity: Int
    private var next: [Key: (boundary: UInt32, order: UInt64)] = [:]
    private var counter: UInt64 = 0

    public init(capacity: Int = 4096) {
        self.capacity = capacity
    }

    /// The one message `payload` carries at a boundary of its stream, or nil.
    public mutating func message(in payload: DNSPacket.Payload) -> ArraySlice<UInt8>? {
        guard let tcp = payload.tcp else { return payload.dns }
        let key = Key(resolver: payload.source, client: payload.destination, clientPort: tcp.destinationPort)
        if tcp.syn {
            remember(key, boundary: tcp.sequence &+ 1)
            return nil
        }
        defer { if tcp.ends { next[key] = nil } }
        let data = payload.dns
        guard !data.isEmpty, let expected = next[key]?.boundary, tcp.sequence == expected else { return nil }
        guard data.count >= 2, Int(data[data.startIndex]) << 8 | Int(data[data.startIndex + 1]) == data.count - 2 else {
            next[key] = nil
            return nil
        }
        next[key]?.boundary = expected &+ UInt32(data.count)
        return data.dropFirst(2)
    }

    public var count: Int { next.count }

    private mutating func remember(_ key: Key, boundary: UInt32) {
        if next[key] == nil, next.count >= capacity, let oldest = next.min(by: { $0.value.order < $1.value.order })?.key {
            next[oldest] = nil
        }
        counter += 1
        next[key] = (boundary, counter)
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
