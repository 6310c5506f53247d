import Crypto
import Foundation
import KeyholeTLS
import SwiftASN1
import Testing
import X509

/// The upstream must prove the SNI *name*: a dNSName SAN, RFC 6125 matching, never an IP.
@Suite("Upstream name verification")
struct UpstreamNameTests {
    func certificate(_ names: [GeneralName], commonName: String = "upstream") throws -> Certificate {
        let key = P256.Signing.PrivateKey()
        return try Certificate(
            version: .v3, serialNumber: Certificate.SerialNumber(), publicKey: .init(key.publicKey),
            notValidBefore: Date().addingTimeInterval(-60), notValidAfter: Date().addingTimeInterval(3600),
            issuer: try DistinguishedName { CommonName(commonName) }, subject: try DistinguishedName { CommonName(commonName) },
            signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                if !names.isEmpty { SubjectAlternativeNames(names) }
            },
            issuerPrivateKey: .init(key))
    }

    @Test func anIPAddressSANNeverEstablishesAName() throws {
        // What an attacker who steered the guest to their own address can get from a public CA.
        let ipOnly = try certificate([.ipAddress(ASN1OctetString(contentBytes: [203, 0, 113, 12]))])
        let problem = try #require(UpstreamName.problem(certificate: ipOnly, name: "api.good.test"))
        #expect(problem.contains("iPAddress"))
        // An IP SAN beside a DNS name for another host does not help either.
        let mixed = try certificate([.ipAddress(ASN1OctetString(contentBytes: [203, 0, 113, 12])), .dnsName("evil.test")])
        #expect(UpstreamName.problem(certificate: mixed, name: "api.good.test") != nil)
    }

    @Test func theCommonNameIsNeverConsulted() throws {
        let cnOnly = try certificate([], commonName: "api.good.test")
        #expect(UpstreamName.problem(certificate: cnOnly, name: "api.good.test") != nil)
    }

    @Test func exactNamesMatchIgnoringCaseAndOneTrailingDot() throws {
        let cert = try certificate([.dnsName("API.Good.Test")])
        #expect(UpstreamName.problem(certificate: cert, name: "api.good.test") == nil)
        #expect(UpstreamName.problem(certificate: cert, name: "api.good.test.") == nil)
        #expect(UpstreamName.problem(certificate: cert, name: "api.good.test.evil") != nil)
        #expect(UpstreamName.problem(certificate: cert, name: "good.test") != nil)
    }

    @Test func aWildcardIsOnlyTheWholeLeftMostLabel() throws {
        let wildcard = try certificate([.dnsName("*.cdn.good.test")])
        #expect(UpstreamName.problem(certificate: wildcard, name: "a.cdn.good.test") == nil)
        #expect(UpstreamName.problem(certificate: wildcard, name: "cdn.good.test") != nil, "never the apex")
        #expect(UpstreamName.problem(certificate: wildcard, name: "a.b.cdn.good.test") != nil, "one label only")
        let partial = try certificate([.dnsName("a*.good.test"), .dnsName("*a.good.test"), .dnsName("api.*.test")])
        #expect(UpstreamName.problem(certificate: partial, name: "api.good.test") != nil)
        #expect(UpstreamName.problem(certificate: partial, name: "ab.good.test") != nil)
        let tooBroad = try certificate([.dnsName("*.test")])
        #expect(UpstreamName.problem(certificate: tooBroad, name: "good.test") != nil)
    }

    @Test func aServerNameThatIsNotAHostNameIsNeverVerified() throws {
        // `bad-.cdn.good.test` matches `*.cdn.good.test` textually; it is no host name.
        let wildcard = try certificate([.dnsName("*.cdn.good.test"), .dnsName("bad-.cdn.good.test")])
        #expect(UpstreamName.problem(certificate: wildcard, name: "bad-.cdn.good.test") != nil)
        #expect(UpstreamName.problem(certificate: wildcard, name: "203.0.113.12") != nil)
        #expect(UpstreamName.problem(certificate: wildcard, name: "") != nil)
    }

    @Test func unreadableCertificatesNeverVerify() {
        #expect(UpstreamName.problem(certificateDER: [0x30, 0x03, 0x02, 0x01, 0x00], name: "api.good.test") != nil)
    }

    @Test func theCacheGivesTheSameAnswersAndStaysBounded() throws {
        var serializer = DER.Serializer()
        try serializer.serialize(try certificate([.dnsName("api.good.test")]))
        let der = serializer.serializedBytes
        var ipSerializer = DER.Serializer()
        try ipSerializer.serialize(try certificate([.ipAddress(ASN1OctetString(contentBytes: [203, 0, 113, 12]))]))
        let cache = UpstreamNameCache(capacity: 3)
        for _ in 0..<2 {
            #expect(cache.problem(certificateDER: der, name: "api.good.test") == nil)
            #expect(cache.problem(certificateDER: der, name: "API.good.test.") == nil)
            #expect(cache.problem(certificateDER: der, name: "evil.test") != nil)
            #expect(cache.problem(certificateDER: ipSerializer.serializedBytes, name: "api.good.test") != nil)
        }
        #expect(cache.count <= 3)
    }
}
