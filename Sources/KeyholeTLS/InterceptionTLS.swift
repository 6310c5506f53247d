import Foundation
public import NIOSSL
import X509

/// TLS for interception: per-name server contexts with forged leaves for the guest side,
/// and one verifying client context for the upstream side.
public final class InterceptionTLS: Sendable {
    public let forge: LeafForge
    /// Upstream verification: the system trust store plus `network.upstream_ca`. Offers
    /// `http/1.1` only.
    public let upstreamContext: NIOSSLContext
    /// The same verification, offering `h2` and `http/1.1`: for a guest that offers `h2`.
    public let upstreamContextHTTP2: NIOSSLContext
    /// Upstream certificates already checked for a name.
    public let upstreamNames = UpstreamNameCache()
    let cache: LeafCertificateCache<ServerContexts>

    /// One forged leaf's two guest-facing contexts: ALPN `http/1.1` only, and `h2` first
    /// (used when the upstream negotiated `h2`).
    struct ServerContexts: Sendable {
        let http1: NIOSSLContext
        let http2: NIOSSLContext
    }

    public init(ca: SandboxCA, upstreamCAFiles: [String], cacheCapacity: Int = 1024) throws(TLSError) {
        forge = try LeafForge(ca: ca)
        cache = LeafCertificateCache(capacity: cacheCapacity, renewBefore: 3600)
        var client = TLSConfiguration.makeClientConfiguration()
        client.certificateVerification = .fullVerification
        client.trustRoots = .default
        client.applicationProtocols = ["http/1.1"]
        client.minimumTLSVersion = .tlsv12
        if !upstreamCAFiles.isEmpty {
            client.additionalTrustRoots = upstreamCAFiles.map { .file($0) }
        }
        do {
            upstreamContext = try NIOSSLContext(configuration: client)
            client.applicationProtocols = ["h2", "http/1.1"]
            upstreamContextHTTP2 = try NIOSSLContext(configuration: client)
        } catch {
            throw .invalidCA(path: upstreamCAFiles.joined(separator: ", "), reason: "cannot build the upstream trust store: \(error)")
        }
    }

    /// The guest-facing context for `name` (an SNI or an IP literal), forging on a miss.
    /// Costs a signature and a context build on a miss: call it off the event loop.
    /// `http2`: the context offers `h2` before `http/1.1` (the upstream speaks it).
    public func serverContext(for name: String, http2: Bool = false) throws(TLSError) -> NIOSSLContext {
        if let cached = cache.lookup(name) { return http2 ? cached.http2 : cached.http1 }
        let leaf = try forge.forge(name)
        do {
            let chain = try leaf.chainDER.map { try NIOSSLCertificate(bytes: $0, format: .der) }
            let key = try NIOSSLPrivateKey(bytes: Array(leaf.privateKey.pemRepresentation.utf8), format: .pem)
            var server = TLSConfiguration.makeServerConfiguration(
                certificateChain: chain.map { .certificate($0) }, privateKey: .privateKey(key))
            // Offer only what the proxy reads, and h2 only where the upstream speaks it.
            server.applicationProtocols = ["http/1.1"]
            server.minimumTLSVersion = .tlsv12
            let http1 = try NIOSSLContext(configuration: server)
            server.applicationProtocols = ["h2", "http/1.1"]
            let contexts = ServerContexts(http1: http1, http2: try NIOSSLContext(configuration: server))
            cache.store(name, contexts, expires: leaf.notValidAfter)
            return http2 ? contexts.http2 : contexts.http1
        } catch {
            throw .forging(reason: "TLS context for \(name): \(error)")
        }
    }

    /// Whether a fresh context for `name` is cached (no forging needed).
    public func hasCachedContext(for name: String) -> Bool { cache.peek(name) }

    public var cacheStatistics: (hits: Int, misses: Int) { cache.statistics }
}
