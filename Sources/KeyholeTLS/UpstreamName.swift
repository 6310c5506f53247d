import KeyholePolicy
import SwiftASN1
import Synchronization
public import X509

/// Whether an upstream's certificate establishes a host *name* (BRIEF §4 (d)): a dNSName
/// subjectAltName that matches the name under RFC 6125 §6.4. An iPAddress SAN never names a
/// host (public CAs issue certificates for bare IPs, and an attacker who steered the guest
/// to their address holds one), the subject's common name is never consulted, and a
/// wildcard counts only as the whole left-most label of a name with at least two more
/// labels (`*.example.com` matches `api.example.com`, not `example.com` nor `a.b.example.com`).
///
/// This check runs after the chain was verified against the trust roots; it replaces
/// NIOSSL's hostname check as the source of "the upstream is `name`", because NIOSSL also
/// accepts an iPAddress SAN equal to the peer's address.
public enum UpstreamName {
    /// Why `certificate` does not establish `name`, or nil when it does.
    public static func problem(certificate: Certificate, name: String) -> String? {
        let host = HostName.normalize(name)
        if let problem = HostName.problem(with: host) { return "the server name \(problem)" }
        let names: SubjectAlternativeNames
        do {
            guard let sans = try certificate.extensions.subjectAlternativeNames else {
                return "the certificate has no subjectAltName extension (a common name is not accepted)"
            }
            names = sans
        } catch {
            return "the certificate's subjectAltName extension cannot be read"
        }
        var dnsNames = 0
        for san in names {
            guard case .dnsName(let dnsName) = san else { continue }
            dnsNames += 1
            if matches(dnsName: dnsName, host: host) { return nil }
        }
        return dnsNames == 0
            ? "the certificate names no DNS name (an iPAddress SAN never establishes a name)"
            : "no DNS name in the certificate matches the server name"
    }

    /// Parses DER and checks it; unreadable certificates never establish a name.
    public static func problem(certificateDER der: [UInt8], name: String) -> String? {
        guard let certificate = try? Certificate(derEncoded: der) else { return "the certificate cannot be parsed" }
        return problem(certificate: certificate, name: name)
    }

    /// RFC 6125 §6.4.1/§6.4.3 with the strict wildcard rule: `*` alone as the left-most
    /// label, matching exactly one non-empty label.
    static func matches(dnsName: String, host: String) -> Bool {
        let pattern = HostName.normalize(dnsName)
        if pattern == host { return HostName.problem(with: pattern) == nil }
        guard pattern.hasPrefix("*.") else { return false }
        let suffix = String(pattern.dropFirst(2))
        // The suffix must be a valid name of two labels or more, with no other wildcard.
        guard suffix.contains("."), HostName.problem(with: suffix) == nil else { return false }
        guard let dot = host.firstIndex(of: ".") else { return false }
        let firstLabel = host[..<dot]
        return !firstLabel.isEmpty && host[host.index(after: dot)...] == suffix
    }
}

/// `UpstreamName.problem` remembered per (certificate, name): an upstream presents the same
/// certificate to every connection, and parsing it (swift-certificates) was a measurable
/// part of a new connection's cost. Only the result of this pure check is kept; the chain is
/// verified on every handshake. Bounded: emptied when full.
public final class UpstreamNameCache: Sendable {
    struct Key: Hashable {
        var der: [UInt8]
        var name: String
    }

    public let capacity: Int
    private let entries: Mutex<[Key: String?]>

    public init(capacity: Int = 1024) {
        self.capacity = capacity
        self.entries = Mutex([:])
    }

    /// Why the certificate (DER) does not establish `name`, or nil when it does.
    public func problem(certificateDER der: [UInt8], name: String) -> String? {
        let key = Key(der: der, name: HostName.normalize(name))
        if let known = entries.withLock({ $0[key] }) { return known }
        let problem = UpstreamName.problem(certificateDER: der, name: name)
        entries.withLock { table in
            if table.count >= capacity { table.removeAll(keepingCapacity: true) }
            table[key] = .some(problem)
        }
        return problem
    }

    public var count: Int { entries.withLock { $0.count } }
}
