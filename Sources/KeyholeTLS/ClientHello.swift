/// Reads the server name from a TLS ClientHello without terminating TLS, so the proxy can
/// decide (bypass, identity, forged leaf) before it answers.
public enum ClientHello {
    public enum Result: Equatable, Sendable {
        /// More bytes are needed for the first record.
        case incomplete
        /// A ClientHello; the SNI host name if the client sent one.
        case clientHello(serverName: String?)
        /// Not a TLS ClientHello.
        case notClientHello
    }

    /// Parses the first TLS record in `bytes`.
    public static func parse(_ bytes: [UInt8]) -> Result {
        guard let first = bytes.first else { return .incomplete }
        guard first == 0x16 else { return .notClientHello }
        guard bytes.count >= 5 else { return .incomplete }
        guard bytes[1] == 0x03 else { return .notClientHello }
        let recordLength = Int(bytes[3]) << 8 | Int(bytes[4])
        guard recordLength >= 4, recordLength <= 16384 + 2048 else { return .notClientHello }
        guard bytes.count >= 5 + recordLength else { return .incomplete }
        var reader = Reader(bytes: bytes[5..<(5 + recordLength)])
        guard reader.u8() == 0x01, let length = reader.u24() else { return .notClientHello }
        // A ClientHello larger than one record is legal but rare; without its extensions
        // we cannot read the name, and the caller treats the flow as having none.
        _ = length
        guard reader.skip(2 + 32),  // version, random
            let sessionLength = reader.u8(), reader.skip(Int(sessionLength)),
            let suitesLength = reader.u16(), reader.skip(Int(suitesLength)),
            let compressionLength = reader.u8(), reader.skip(Int(compressionLength))
        else { return .clientHello(serverName: nil) }
        guard let extensionsLength = reader.u16() else { return .clientHello(serverName: nil) }
        var extensions = Reader(bytes: reader.take(Int(extensionsLength)) ?? [])
        while let type = extensions.u16(), let size = extensions.u16() {
            guard let body = extensions.take(Int(size)) else { break }
            guard type == 0 else { continue }  // server_name
            var list = Reader(bytes: body)
            guard let listLength = list.u16() else { break }
            var names = Reader(bytes: list.take(Int(listLength)) ?? [])
            while let nameType = names.u8(), let nameLength = names.u16(), let name = names.take(Int(nameLength)) {
                if nameType == 0, let text = String(validating: name, as: UTF8.self), !text.isEmpty {
                    return .clientHello(serverName: text)
                }
            }
        }
        return .clientHello(serverName: nil)
    }

    /// The application protocols (ALPN) the ClientHello in `bytes` offers, in its order;
    /// empty when it offers none or is not a whole ClientHello.
    public static func applicationProtocols(_ bytes: [UInt8]) -> [String] {
        guard bytes.count >= 5, bytes[0] == 0x16, bytes[1] == 0x03 else { return [] }
        let recordLength = Int(bytes[3]) << 8 | Int(bytes[4])
        guard recordLength >= 4, bytes.count >= 5 + recordLength else { return [] }
        var reader = Reader(bytes: bytes[5..<(5 + recordLength)])
        guard reader.u8() == 0x01, reader.u24() != nil, reader.skip(2 + 32),
            let sessionLength = reader.u8(), reader.skip(Int(sessionLength)),
            let suitesLength = reader.u16(), reader.skip(Int(suitesLength)),
            let compressionLength = reader.u8(), reader.skip(Int(compressionLength)),
            let extensionsLength = reader.u16()
        else { return [] }
        var extensions = Reader(bytes: reader.take(Int(extensionsLength)) ?? [])
        while let type = extensions.u16(), let size = extensions.u16() {
            guard let body = extensions.take(Int(size)) else { break }
            guard type == 16 else { continue }  // application_layer_protocol_negotiation
            var list = Reader(bytes: body)
            guard let listLength = list.u16() else { return [] }
            var entries = Reader(bytes: list.take(Int(listLength)) ?? [])
            var protocols: [String] = []
            while let length = entries.u8(), let name = entries.take(Int(length)) {
                if let text = String(validating: name, as: UTF8.self) { protocols.append(text) }
            }
            return protocols
        }
        return []
    }

    struct Reader {
        var bytes: ArraySlice<UInt8>

        init(bytes: ArraySlice<UInt8>) { self.bytes = bytes }
        init(bytes: [UInt8]) { self.bytes = bytes[...] }

        mutating func u8() -> UInt8? {
            guard let b = bytes.first else { return nil }
            bytes = bytes.dropFirst()
            return b
        }

        mutating func u16() -> UInt16? {
            guard let a = u8(), let b = u8() else { return nil }
            return UInt16(a) << 8 | UInt16(b)
        }

        mutating func u24() -> Int? {
            guard let a = u8(), let b = u16() else { return nil }
            return Int(a) << 16 | Int(b)
        }

        mutating func skip(_ count: Int) -> Bool {
            guard bytes.count >= count else { return false }
            bytes = bytes.dropFirst(count)
            return true
        }

        mutating func take(_ count: Int) -> ArraySlice<UInt8>? {
            guard bytes.count >= count else { return nil }
            defer { bytes = bytes.dropFirst(count) }
            return bytes.prefix(count)
        }
    }
}
