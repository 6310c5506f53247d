import Crypto
import Foundation
import KeyholeTLS
import NIOCore
import NIOEmbedded
import NIOSSL
import SwiftASN1
import Testing
import X509

@Suite("Leaf forging and ClientHello")
struct InterceptionTests {
    func temporaryCA() throws -> (SandboxCA, String) {
        let dir = "/tmp/keyhole-forge-test-\(UUID().uuidString)"
        return (try SandboxCA.loadOrCreate(stateDirectory: dir), dir)
    }

    @Test func leavesAreShortLivedServerCertificatesSignedByTheCA() throws {
        let (ca, dir) = try temporaryCA()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let forge = try LeafForge(ca: ca)
        let now = Date()
        let leaf = try forge.forge("api.example.test", now: now)
        let cert = leaf.certificate
        #expect(cert.issuer == ca.certificate.subject)
        #expect(ca.certificate.publicKey.isValidSignature(cert.signature, for: cert))
        #expect(try cert.extensions.subjectAlternativeNames == SubjectAlternativeNames([.dnsName("api.example.test")]))
        #expect(try cert.extensions.extendedKeyUsage?.contains(.serverAuth) == true)
        #expect(try cert.extensions.basicConstraints == .notCertificateAuthority)
        #expect(cert.notValidBefore <= now.addingTimeInterval(-3000), "notBefore is backdated")
        #expect(cert.notValidAfter <= now.addingTimeInterval(25 * 3600), "validity is short")
        #expect(P256.Signing.PublicKey(cert.publicKey) != nil)
        #expect(leaf.chainDER.count == 2)
    }

    @Test func anIPAddressGetsAnIPAddressSAN() throws {
        let (ca, dir) = try temporaryCA()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let leaf = try LeafForge(ca: ca).forge("203.0.113.7")
        let san = try #require(try leaf.certificate.extensions.subjectAlternativeNames)
        #expect(Array(san) == [.ipAddress(ASN1OctetString(contentBytes: [203, 0, 113, 7]))])
    }

    @Test func theContextCacheHitsRenewsAndStaysBounded() throws {
        let cache = LeafCertificateCache<Int>(capacity: 3, renewBefore: 60)
        let now = Date()
        #expect(cache.lookup("a", now: now) == nil)
        cache.store("a", 1, expires: now.addingTimeInterval(3600))
        #expect(cache.lookup("a", now: now) == 1)
        // Within the renewal window the entry no longer counts: the caller forges anew.
        #expect(cache.lookup("a", now: now.addingTimeInterval(3600 - 30)) == nil)
        for (i, name) in ["b", "c", "d", "e"].enumerated() { cache.store(name, i, expires: now.addingTimeInterval(3600)) }
        #expect(cache.count == 3)
        #expect(cache.statistics.hits == 1)
        #expect(cache.statistics.misses == 2)
    }

    @Test func interceptionContextsAreCachedPerName() throws {
        let (ca, dir) = try temporaryCA()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let tls = try InterceptionTLS(ca: ca, upstreamCAFiles: [])
        #expect(!tls.hasCachedContext(for: "a.example.test"))
        let first = try tls.serverContext(for: "a.example.test")
        #expect(tls.hasCachedContext(for: "a.example.test"))
        let second = try tls.serverContext(for: "a.example.test")
        #expect(first === second)
    }

    /// A real ClientHello, as NIOSSL's client writes it.
    func clientHello(serverName: String?, alpn: [String] = []) throws -> [UInt8] {
        let channel = EmbeddedChannel()
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.certificateVerification = .none
        configuration.applicationProtocols = alpn
        let handler = try NIOSSLClientHandler(context: try NIOSSLContext(configuration: configuration), serverHostname: serverName)
        try channel.pipeline.syncOperations.addHandler(handler)
        channel.pipeline.fireChannelActive()
        var bytes: [UInt8] = []
        while let buffer = try channel.readOutbound(as: ByteBuffer.self) { bytes += buffer.readableBytesView }
        _ = try? channel.finish()
        return bytes
    }

    @Test func readsTheApplicationProtocolsFromARealClientHello() throws {
        #expect(ClientHello.applicationProtocols(try clientHello(serverName: "a.example.test", alpn: ["h2", "http/1.1"])) == ["h2", "http/1.1"])
        #expect(ClientHello.applicationProtocols(try clientHello(serverName: nil, alpn: ["h2"])) == ["h2"])
        #expect(ClientHello.applicationProtocols(try clientHello(serverName: "a.example.test")) == [])
        let hello = try clientHello(serverName: "a.example.test", alpn: ["h2"])
        #expect(ClientHello.applicationProtocols(Array(hello.prefix(hello.count - 1))) == [])
        for cut in stride(from: 5, to: hello.count, by: 5) {
            var mangled = hello
            mangled[3] = UInt8((cut - 5) >> 8)
            mangled[4] = UInt8((cut - 5) & 0xFF)
            _ = ClientHello.applicationProtocols(Array(mangled.prefix(cut)))
        }
    }

    @Test func readsTheServerNameFromARealClientHello() throws {
        let hello = try clientHello(serverName: "api.example.test")
        #expect(ClientHello.parse(hello) == .clientHello(serverName: "api.example.test"))
        #expect(ClientHello.parse(Array(hello.prefix(40))) == .incomplete)
        #expect(ClientHello.parse(try clientHello(serverName: nil)) == .clientHello(serverName: nil))
        #expect(ClientHello.parse(Array("GET / HTTP/1.1\r\n".utf8)) == .notClientHello)
        // Truncated inner lengths never crash.
        for cut in stride(from: 5, to: hello.count, by: 7) {
            var mangled = hello
            mangled[3] = UInt8((cut - 5) >> 8)
            mangled[4] = UInt8((cut - 5) & 0xFF)
            _ = ClientHello.parse(Array(mangled.prefix(cut)))
        }
    }
}
