public import KeyholePolicy

/// The part of a DNS response Keyhole needs: the question, and the addresses it resolved
/// to through any CNAME chain, each with the smallest TTL along its chain.
public struct DNSResolution: Sendable, Hashable {
    public struct Address: Sendable, Hashable {
        public var address: IPAddress
        public var ttl: UInt32

        public init(address: IPAddress, ttl: UInt32) {
            self.address = address
            self.ttl = ttl
        }
    }

    public var transactionID: UInt16
    /// The name the guest asked for, normalized (lower case, no trailing dot).
    public var queriedName: String
    public var addresses: [Address]
    /// Names passed through on the way (`www.example.com` → `cdn.example.net` → …).
    public var chain: [String]
}

public enum DNSParseError: Error, Sendable, Hashable {
    case truncated
    case notAResponse
    case noQuestion
    case badName
    case compressionLoop
}

/// A bounds-checked reader of DNS wire format (RFC 1035), resolving name compression.
public enum DNSMessage {
    static let typeA: UInt16 = 1
    static let typeCNAME: UInt16 = 5
    static let typeAAAA: UInt16 = 28
    static let classIN: UInt16 = 1

    /// A recursive query for `name` (A when `ipv6` is false, else AAAA), as a UDP payload.
    /// Nil for a name that is not a valid DNS name (labels of 1–63 bytes, 253 in all).
    public static func query(id: UInt16, name: String, ipv6: Bool) -> [UInt8]? {
        let labels = name.split(separator: ".", omittingEmptySubsequences: false)
        guard name.utf8.count <= 253, !labels.isEmpty, labels.allSatisfy({ (1...63).contains($0.utf8.count) }) else { return nil }
        var bytes: [UInt8] = [UInt8(id >> 8), UInt8(id & 0xFF), 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]
        for label in labels {
            bytes.append(UInt8(label.utf8.count))
            bytes += label.utf8
        }
        let type = ipv6 ? typeAAAA : typeA
        bytes += [0, UInt8(type >> 8), UInt8(type & 0xFF), 0, UInt8(classIN)]
        return bytes
    }

    /// Parses a DNS response (UDP payload; strip the 2-byte length for TCP first).
    public static func parseResponse(_ bytes: [UInt8]) throws(DNSParseError) -> DNSResolution {
        var reader = Reader(bytes: bytes)
        let id = try reader.u16()
        let flags = try reader.u16()
        guard flags & 0x8000 != 0 else { throw .notAResponse }
        let questions = try reader.u16()
        let answers = try reader.u16()
        _ = try reader.u16()  // authority
        _ = try reader.u16()  // additional
        guard questions >= 1 else { throw .noQuestion }
        let queried = try reader.name()
        _ = try reader.u16()  // qtype
        _ = try reader.u16()  // qclass
        for _ in 1..<Int(questions) {
            _ = try reader.name()
            try reader.skip(4)
        }

        var cnames: [String: (String, UInt32)] = [:]
        var records: [String: [(IPAddress, UInt32)]] = [:]
        for _ in 0..<Int(answers) {
            let owner = try reader.name()
            let type = try reader.u16()
            let klass = try reader.u16()
            let ttl = try reader.u32()
            let length = Int(try reader.u16())
            let start = reader.offset
            guard start + length <= bytes.count else { throw .truncated }
            if klass == classIN {
                switch type {
                case typeA where length == 4:
                    records[owner, default: []].append((IPAddress(v4Bytes: Array(bytes[start..<start + 4])), ttl))
                case typeAAAA where length == 16:
                    records[owner, default: []].append((IPAddress(v6Bytes: Array(bytes[start..<start + 16])), ttl))
                case typeCNAME:
                    var inner = reader
                    let target = try inner.name()
                    cnames[owner] = (target, ttl)
                default:
                    break
                }
            }
            reader.offset = start + length
        }

        // Follow the chain from the question; records for unrelated owners are ignored, so a
        // resolver cannot pin an address to a name the guest did not ask about.
        var current = queried
        var ttlCap = UInt32.max
        var chain: [String] = []
        var visited: Set<String> = [queried]
        while let (target, ttl) = cnames[current] {
            ttlCap = min(ttlCap, ttl)
            guard visited.insert(target).inserted else { break }
            chain.append(target)
            current = target
        }
        var addresses: [DNSResolution.Address] = []
        for name in [queried] + chain {
            for (address, ttl) in records[name] ?? [] {
                addresses.append(.init(address: address, ttl: min(ttl, ttlCap)))
            }
        }
        return DNSResolution(transactionID: id, queriedName: queried, addresses: addresses, chain: chain)
    }

    struct Reader {
        let bytes: [UInt8]
        var offset = 0

        mutating func u8() throws(DNSParseError) -> UInt8 {
            guard offset < bytes.count else { throw .truncated }
            defer { offset += 1 }
            return bytes[offset]
        }

        mutating func u16() throws(DNSParseError) -> UInt16 {
            UInt16(try u8()) << 8 | UInt16(try u8())
        }

        mutating func u32() throws(DNSParseError) -> UInt32 {
            UInt32(try u16()) << 16 | UInt32(try u16())
        }

        mutating func skip(_ count: Int) throws(DNSParseError) {
            guard offset + count <= bytes.count else { throw .truncated }
            offset += count
        }

        /// Reads a (possibly compressed) name, normalized to lower case without trailing dot.
        mutating func name() throws(DNSParseError) -> String {
            var labels: [String] = []
            var position = offset
            var jumped = false
            var jumps = 0
            var total = 0
            while true {
                guard position < bytes.count else { throw .truncated }
                let length = Int(bytes[position])
                if length & 0xC0 == 0xC0 {
                    guard position + 1 < bytes.count else { throw .truncated }
                    let pointer = (length & 0x3F) << 8 | Int(bytes[position + 1])
                    if !jumped { offset = position + 2 }
                    jumped = true
                    jumps += 1
                    guard jumps <= 32, pointer < position else { throw .compressionLoop }
                    position = pointer
                    continue
                }
                guard length & 0xC0 == 0 else { throw .badName }
                position += 1
                if length == 0 { break }
                guard position + length <= bytes.count else { throw .truncated }
                total += length + 1
                guard total <= 255 else { throw .badName }
                labels.append(String(decoding: bytes[position..<position + length], as: UTF8.self))
                position += length
            }
            if !jumped { offset = position }
            return HostName.normalize(labels.joined(separator: "."))
        }
    }
}
