/// Host names as Keyhole compares them: ASCII, case-insensitive, one trailing dot ignored.
public enum HostName {
    /// Lower-cases ASCII and drops one trailing dot. Does not validate. Inlinable: it runs
    /// for every name a connection is checked against, and specialized for `String` it
    /// walks the bytes directly.
    @inlinable
    public static func normalize<S: StringProtocol>(_ host: S) -> String {
        // Most names arrive normalized (SNI, allow lists): then no copy of the bytes.
        var last: UInt8 = 0
        var upper = false
        for byte in host.utf8 {
            upper = upper || (byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z"))
            last = byte
        }
        if !upper && last != UInt8(ascii: ".") { return String(host) }
        var bytes = Array(host.utf8)
        if bytes.last == UInt8(ascii: ".") { bytes.removeLast() }
        for i in bytes.indices where bytes[i] >= UInt8(ascii: "A") && bytes[i] <= UInt8(ascii: "Z") {
            bytes[i] |= 0x20
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// Why `host` (already normalized) is not a valid DNS host name, or nil when it is.
    /// Labels are 1–63 of `a-z 0-9 - _`, not starting or ending with `-`; 253 bytes in all.
    /// Runs for every name a connection is checked against: one pass over the bytes, no
    /// allocation; the IP-literal test only for a name the label rules already refuse.
    public static func problem(with host: String) -> String? {
        if host.isEmpty { return "is empty" }
        if host.utf8.count > 253 { return "is longer than 253 characters" }
        guard let problem = labelProblem(host) else { return nil }
        // Every IP literal breaks a label rule (`:`, or all digits and dots): say what it is.
        if IPAddress(host) != nil {
            return "is an IP address; allow lists name hosts, because identity is established by name (SNI, Host, DNS)"
        }
        return problem
    }

    private static func labelProblem(_ host: String) -> String? {
        let utf8 = host.utf8
        var start = utf8.startIndex
        while true {
            let end = utf8[start...].firstIndex(of: UInt8(ascii: ".")) ?? utf8.endIndex
            let label = utf8[start..<end]
            if label.isEmpty { return "has an empty label" }
            if label.count > 63 { return "has a label longer than 63 characters" }
            for byte in label {
                let ok = (byte >= 0x61 && byte <= 0x7A) || (byte >= 0x30 && byte <= 0x39) || byte == 0x2D || byte == 0x5F
                if !ok {
                    if byte == UInt8(ascii: "*") { return "contains '*'; wildcards belong in allow_host_patterns" }
                    if byte >= 0x80 { return "is not ASCII; write internationalized names in their xn-- form" }
                    return "contains a character that is not allowed in a host name"
                }
            }
            if label.first == 0x2D || label.last == 0x2D { return "has a label that starts or ends with '-'" }
            if end == utf8.endIndex { break }
            start = utf8.index(after: end)
        }
        if utf8.allSatisfy({ ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x2E }) {
            return "is all digits and dots, which is not a host name"
        }
        return nil
    }
}

/// `*.example.com`: one or more labels in front of the suffix; never the apex itself.
public struct HostPattern: Sendable, Hashable, CustomStringConvertible {
    /// The normalized suffix without the leading `*.` (for example `example.com`).
    public let suffix: String
    private let dottedSuffix: String

    /// Parses `*.suffix`. Returns nil with a reason through `problem(with:)` when invalid.
    public init?(_ pattern: String) {
        guard HostPattern.problem(with: pattern) == nil else { return nil }
        let suffix = HostName.normalize(pattern.dropFirst(2))
        self.suffix = suffix
        self.dottedSuffix = "." + suffix
    }

    public static func problem(with pattern: String) -> String? {
        guard pattern.hasPrefix("*.") else {
            return "must have the form \"*.example.com\" (a '*.' followed by a domain)"
        }
        let suffix = HostName.normalize(pattern.dropFirst(2))
        if suffix.contains("*") { return "may contain '*' only as its first label" }
        if let problem = HostName.problem(with: suffix) { return "has a suffix that \(problem)" }
        if !suffix.contains(".") {
            return "would match every name under the top-level domain '\(suffix)'; name a registered domain"
        }
        return nil
    }

    public func matches(normalizedHost host: String) -> Bool {
        host.utf8.count > dottedSuffix.utf8.count && host.hasSuffix(dottedSuffix)
    }

    public var description: String { "*." + suffix }
}

/// The hosts a secret may be substituted for (or that TLS bypass applies to).
public struct HostAllowList: Sendable, Hashable, CustomStringConvertible {
    public var exact: Set<String>
    public var patterns: [HostPattern]
    public var anyHost: Bool

    public init(exact: [String] = [], patterns: [HostPattern] = [], anyHost: Bool = false) {
        self.exact = Set(exact.map { HostName.normalize($0) })
        self.patterns = patterns
        self.anyHost = anyHost
    }

    public var isEmpty: Bool { exact.isEmpty && patterns.isEmpty && !anyHost }

    /// Whether `host` is a valid host name (after normalizing) that the list allows. A
    /// name that is not a valid DNS host name (`bad-.example.com`, an IP literal, empty) is
    /// no name at all: nothing allows it, not even `anyHost`.
    public func allows<S: StringProtocol>(_ host: S) -> Bool {
        let normalized = HostName.normalize(host)
        guard HostName.problem(with: normalized) == nil else { return false }
        if anyHost { return true }
        if exact.contains(normalized) { return true }
        return patterns.contains { $0.matches(normalizedHost: normalized) }
    }

    public var description: String {
        if anyHost { return "any host" }
        let all = exact.sorted() + patterns.map(\.description)
        return all.isEmpty ? "no host" : all.joined(separator: ", ")
    }
}
