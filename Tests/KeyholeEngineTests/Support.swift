import KeyholeEngine
import KeyholePolicy
import NIOCore

let token = Secret(
    env: "TOKEN", value: SecretValue("real-token-value"),
    allowedHosts: HostAllowList(exact: ["api.example.com"]))

func secret(
    _ env: String, value: String, hosts: [String] = ["api.example.com"], patterns: [String] = [],
    inject: Injection = Injection(), requireTLS: Bool = true, placeholder: String? = nil
) -> Secret {
    Secret(
        env: env, placeholder: placeholder, value: SecretValue(value),
        allowedHosts: HostAllowList(exact: hosts, patterns: patterns.compactMap(HostPattern.init)),
        requireTLSIdentity: requireTLS, inject: inject)
}

struct Run {
    var bytes: [UInt8]
    var events: [RewriteEvent]
    var status: RequestRewriter.Status
    var output: RewriteOutput

    var text: String { String(decoding: bytes, as: UTF8.self) }
    var violations: [Violation] {
        events.compactMap { if case .violation(let v) = $0 { return v } else { return nil } }
    }
    var framingErrors: [FramingError] {
        events.compactMap { if case .framingError(let e, _) = $0 { return e } else { return nil } }
    }
    var hostMismatches: Int {
        events.filter { if case .hostMismatch = $0 { return true } else { return false } }.count
    }
    var substitutions: [(String, Site)] {
        events.compactMap { if case .substituted(let s, let site, _) = $0 { return (s, site) } else { return nil } }
    }
}

/// Feeds `input` to a fresh rewriter in pieces of `chunk` bytes (all at once when nil).
func rewrite(
    _ input: String, secrets: [Secret] = [token], identity: ConnectionIdentity = .verifiedTLS(sni: "api.example.com"),
    chunk: Int? = nil, configuration: RewriterConfiguration = RewriterConfiguration(), mode: RequestRewriter.Mode = .http,
    upgrade: Bool? = nil, finish: Bool = true
) -> Run {
    rewrite(bytes: Array(input.utf8), secrets: secrets, identity: identity, chunk: chunk, configuration: configuration, mode: mode, upgrade: upgrade, finish: finish)
}

func rewrite(
    bytes input: [UInt8], secrets: [Secret] = [token], identity: ConnectionIdentity = .verifiedTLS(sni: "api.example.com"),
    chunk: Int? = nil, configuration: RewriterConfiguration = RewriterConfiguration(), mode: RequestRewriter.Mode = .http,
    upgrade: Bool? = nil, finish: Bool = true
) -> Run {
    let rewriter = RequestRewriter(identity: identity, secrets: secrets, configuration: configuration, mode: mode)
    var output = RewriteOutput()
    var bytes: [UInt8] = []
    var events: [RewriteEvent] = []
    func collect() {
        for buffer in output.upstream { bytes += buffer.readableBytesView }
        output.upstream.removeAll()
        events += output.events
        output.events.removeAll()
        if rewriter.status == .awaitingUpgradeDecision, let upgrade {
            if upgrade { rewriter.upgradeAccepted(into: &output) } else { rewriter.upgradeDeclined(into: &output) }
            collect()
        }
    }
    let size = max(1, chunk ?? input.count)
    var offset = 0
    while offset < input.count {
        let end = min(input.count, offset + size)
        rewriter.consume(ByteBuffer(bytes: input[offset..<end]), into: &output)
        collect()
        offset = end
    }
    if finish {
        rewriter.finish(into: &output)
        collect()
    }
    return Run(bytes: bytes, events: events, status: rewriter.status, output: output)
}

/// Chunk sizes that split inputs at every interesting boundary.
let chunkSizes = [1, 2, 3, 5, 7, 13, 64, 1000, nil] as [Int?]
