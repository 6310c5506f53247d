public import KeyholePolicy

/// A policy secret in the form the rewriter works with: placeholder and value as bytes,
/// plus the encoded forms of the value each substitution site inserts.
public struct CompiledSecret: Sendable {
    public let env: String
    public let placeholder: [UInt8]
    public let allowedHosts: HostAllowList
    public let requireTLSIdentity: Bool
    public let inject: Injection
    /// Hosts the placeholder may travel to unchanged.
    public let passthroughHosts: HostAllowList
    /// The real value, as sent in headers and bodies.
    let raw: [UInt8]
    /// The real value percent-encoded (RFC 3986 unreserved characters kept), for queries
    /// and form bodies.
    let percentEncoded: [UInt8]

    public init(_ secret: Secret) {
        env = secret.env
        placeholder = Array(secret.placeholder.utf8)
        allowedHosts = secret.allowedHosts
        requireTLSIdentity = secret.requireTLSIdentity
        inject = secret.inject
        passthroughHosts = secret.passthroughHosts
        raw = secret.value.bytes
        percentEncoded = PercentEncoding.encode(secret.value.bytes)
    }
}

public enum PercentEncoding {
    /// Percent-encodes everything but RFC 3986 unreserved characters (`A-Z a-z 0-9 - . _ ~`).
    public static func encode(_ bytes: [UInt8]) -> [UInt8] {
        let hex = Array("0123456789ABCDEF".utf8)
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count)
        for byte in bytes {
            if isUnreserved(byte) {
                out.append(byte)
            } else {
                out.append(UInt8(ascii: "%"))
                out.append(hex[Int(byte >> 4)])
                out.append(hex[Int(byte & 0xF)])
            }
        }
        return out
    }

    @inline(__always)
    static func isUnreserved(_ b: UInt8) -> Bool {
        (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A) || (b >= 0x30 && b <= 0x39) || b == 0x2D || b == 0x2E
            || b == 0x5F || b == 0x7E
    }
}
