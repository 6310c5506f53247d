public import Crypto
public import Foundation
import KeyholePolicy
import SwiftASN1
import Synchronization
public import X509

/// A forged server certificate for one name, signed by the sandbox CA.
public struct ForgedLeaf: Sendable {
    /// The name (or IP literal) the leaf is for.
    public let name: String
    public let certificate: Certificate
    /// DER of the leaf, then of the CA: the chain a guest receives.
    public let chainDER: [[UInt8]]
    public let privateKey: P256.Signing.PrivateKey
    public let notValidAfter: Date
}

/// Forges leaf certificates for the names guests connect to (BRIEF §4 TLS): SAN = the SNI
/// (an iPAddress SAN when the guest sent none), serverAuth, notBefore backdated, short
/// validity, one P-256 key per process for all leaves (forging then costs one signature).
public struct LeafForge: Sendable {
    public let ca: SandboxCA
    /// How long a leaf is valid.
    public let validity: TimeInterval
    /// How far notBefore is backdated (guests with slightly wrong clocks still accept it).
    public let backdate: TimeInterval
    let leafKey: P256.Signing.PrivateKey
    let caKeyIdentifier: ArraySlice<UInt8>?
    let caDER: [UInt8]

    public init(ca: SandboxCA, validity: TimeInterval = 24 * 3600, backdate: TimeInterval = 3600) throws(TLSError) {
        self.ca = ca
        self.validity = validity
        self.backdate = backdate
        self.leafKey = P256.Signing.PrivateKey()
        self.caKeyIdentifier = (try? ca.certificate.extensions.subjectKeyIdentifier)?.keyIdentifier
        var serializer = DER.Serializer()
        do {
            try serializer.serialize(ca.certificate)
        } catch {
            throw .forging(reason: "cannot encode the CA certificate")
        }
        self.caDER = serializer.serializedBytes
    }

    /// Forges a leaf for `name`: a DNS name, or an IP address literal.
    public func forge(_ name: String, now: Date = Date()) throws(TLSError) -> ForgedLeaf {
        let subjectName: DistinguishedName
        let publicKey = Certificate.PublicKey(leafKey.publicKey)
        let san: GeneralName
        if let address = IPAddress(name) {
            san = .ipAddress(ASN1OctetString(contentBytes: ArraySlice(address.bytes)))
        } else {
            san = .dnsName(name)
        }
        let notAfter = now.addingTimeInterval(validity)
        do {
            subjectName = try DistinguishedName { CommonName(String(name.prefix(64))) }
            let certificate = try Certificate(
                version: .v3,
                serialNumber: Certificate.SerialNumber(),
                publicKey: publicKey,
                notValidBefore: now.addingTimeInterval(-backdate),
                notValidAfter: notAfter,
                issuer: ca.certificate.subject,
                subject: subjectName,
                signatureAlgorithm: .ecdsaWithSHA256,
                extensions: try Certificate.Extensions {
                    Critical(BasicConstraints.notCertificateAuthority)
                    Critical(KeyUsage(digitalSignature: true))
                    try ExtendedKeyUsage([.serverAuth])
                    SubjectAlternativeNames([san])
                    if let caKeyIdentifier {
                        AuthorityKeyIdentifier(keyIdentifier: caKeyIdentifier)
                    }
                },
                issuerPrivateKey: Certificate.PrivateKey(ca.privateKey)
            )
            var serializer = DER.Serializer()
            try serializer.serialize(certificate)
            return ForgedLeaf(
                name: name, certificate: certificate, chainDER: [serializer.serializedBytes, caDER], privateKey: leafKey,
                notValidAfter: notAfter)
        } catch {
            throw .forging(reason: "leaf for \(name): \(error)")
        }
    }
}

/// Leaves (and whatever the caller derives from them, such as TLS contexts) cached per
/// name, renewed before they expire, bounded in number (least recently used goes first).
public final class LeafCertificateCache<Value: Sendable>: Sendable {
    struct Entry {
        var value: Value
        var expires: Date
        var lastUse: UInt64
    }

    public let capacity: Int
    /// A leaf is replaced when less than this remains of its validity.
    public let renewBefore: TimeInterval
    private let state: Mutex<(entries: [String: Entry], clock: UInt64, hits: Int, misses: Int)>

    public init(capacity: Int = 1024, renewBefore: TimeInterval = 3600) {
        self.capacity = capacity
        self.renewBefore = renewBefore
        self.state = Mutex(([:], 0, 0, 0))
    }

    /// The cached value for `name` if it is still fresh; counts a hit or a miss.
    public func lookup(_ name: String, now: Date = Date()) -> Value? {
        state.withLock { s in
            s.clock += 1
            if var entry = s.entries[name], entry.expires.timeIntervalSince(now) > renewBefore {
                entry.lastUse = s.clock
                s.entries[name] = entry
                s.hits += 1
                return entry.value
            }
            s.misses += 1
            return nil
        }
    }

    public func store(_ name: String, _ value: Value, expires: Date) {
        state.withLock { s in
            s.clock += 1
            if s.entries[name] == nil, s.entries.count >= capacity,
                let oldest = s.entries.min(by: { $0.value.lastUse < $1.value.lastUse })?.key
            {
                s.entries[oldest] = nil
            }
            s.entries[name] = Entry(value: value, expires: expires, lastUse: s.clock)
        }
    }

    /// True when a fresh entry exists; does not count as a hit or a miss.
    public func peek(_ name: String, now: Date = Date()) -> Bool {
        state.withLock { s in
            guard let entry = s.entries[name] else { return false }
            return entry.expires.timeIntervalSince(now) > renewBefore
        }
    }

    public var count: Int { state.withLock { $0.entries.count } }
    public var statistics: (hits: Int, misses: Int) { state.withLock { ($0.hits, $0.misses) } }
}
