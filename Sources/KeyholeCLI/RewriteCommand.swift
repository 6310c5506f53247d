import ArgumentParser
import KeyholeEngine
import KeyholePolicy
import KeyholeProxy
import NIOCore

#if canImport(Glibc)
import Glibc
#endif

struct RewriteCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rewrite",
        abstract: "Offline engine: rewrite the raw request stream of one guest connection.",
        discussion: """
            Reads the bytes a guest would send on one connection to HOST from stdin, writes \
            exactly the bytes that would go upstream to stdout, and audit events (JSON lines) \
            to stderr. The output does not depend on --chunk-size.

            With --response FILE, FILE is the upstream's answer on that connection: stdout \
            then carries what the guest would receive (responses paired with the requests, \
            real values masked), and the upstream bytes go to --upstream-output if given. \
            Masking is on as in the proxy: when a secret is allowed for HOST, or once a \
            substitution happened; where it is on from the start, requests then ask for \
            Accept-Encoding: identity, as the proxy's do (without --response they are shown \
            as the engine alone rewrites them).

            Exit status: 0 passed, 3 blocked (violation or broken framing), 2 usage or policy error.
            """
    )

    enum Identity: String, ExpressibleByArgument, CaseIterable {
        case verified, unverified
    }

    enum UpgradeAnswer: String, ExpressibleByArgument, CaseIterable {
        case accept, decline
    }

    @Option(help: ArgumentHelp("Policy file.", valueName: "file"))
    var policy: String

    @Option(help: ArgumentHelp("The host the guest connected to (TLS server name, or the resolved name for --plain).", valueName: "host"))
    var sni: String

    @Flag(help: "Plain HTTP (no TLS at all).")
    var plain = false

    @Option(
        help: ArgumentHelp(
            "verified: SNI matched, DNS pin held, upstream certificate verified. unverified: the upstream's TLS identity could not be established.",
            valueName: "verified|unverified"))
    var identity: Identity = .verified

    @Flag(help: "Simulate a connection to an address no observed DNS answer gave for the host.")
    var noDNSPin = false

    @Option(help: ArgumentHelp("Feed the engine N bytes at a time (default: as read).", valueName: "n"))
    var chunkSize: Int?

    @Option(help: ArgumentHelp("How the simulated upstream answers an Upgrade/CONNECT request.", valueName: "accept|decline"))
    var upgrade: UpgradeAnswer = .accept

    @Option(help: ArgumentHelp("Largest Content-Length body held for body substitution, in bytes.", valueName: "bytes"))
    var maxHeldBody: Int = RewriterConfiguration().maxHeldBody

    @Option(help: ArgumentHelp("The upstream's response stream: stdout becomes what the guest receives (masked).", valueName: "file"))
    var response: String?

    @Option(help: ArgumentHelp("With --response: where the upstream bytes go (default: nowhere).", valueName: "file"))
    var upstreamOutput: String?

    func validate() throws {
        if let chunkSize, chunkSize < 1 { throw ValidationError("--chunk-size must be at least 1") }
        if maxHeldBody < 0 { throw ValidationError("--max-held-body must not be negative") }
    }

    func run() throws {
        let loaded = try PolicyFile.load(policy)
        let host = HostName.normalize(sni)
        let pinned: Set<String> = noDNSPin ? [] : [host]
        let connection = ConnectionIdentity(
            sni: plain ? nil : host, dnsPinnedNames: identity == .verified || !plain ? pinned : [],
            upstreamVerified: !plain && identity == .verified)
        var configuration = RewriterConfiguration()
        configuration.maxHeldBody = maxHeldBody
        // Masking as in the proxy: a secret allowed for the host, or a substitution.
        let masking = loaded.secrets.contains { $0.allowedHosts.allows(host) }
        // With a response to read, requests also ask for identity as the proxy's do.
        configuration.identityResponses = masking && response != nil
        let rewriter = RequestRewriter(identity: connection, secrets: loaded.secrets, configuration: configuration)
        let audit = AuditLine(sandbox: loaded.name, sni: plain ? nil : host, action: loaded.network.onSecretViolation)
        let masker = ResponseMasker(secrets: loaded.secrets, masking: masking)
        var upstreamFD: Int32 = response == nil ? 1 : -1
        if response != nil, let upstreamOutput {
            upstreamFD = open(upstreamOutput, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
            guard upstreamFD >= 0 else { throw ValidationError("\(upstreamOutput): cannot open for writing") }
        }
        defer { if upstreamFD > 1 { close(upstreamFD) } }

        var output = RewriteOutput()
        var blocked = false
        func deliver() {
            if upstreamFD >= 0 { for buffer in output.upstream { StandardStream.write(upstreamFD, buffer) } }
            output.upstream.removeAll(keepingCapacity: true)
            for expected in output.expectedResponses { masker.expect(expected) }
            output.expectedResponses.removeAll(keepingCapacity: true)
            for event in output.events {
                Output.err(audit.json(event))
                if case .substituted = event {
                    masker.activate()
                    continue
                }
                if case .passedThrough = event { continue }
                blocked = true
            }
            output.events.removeAll(keepingCapacity: true)
            if rewriter.status == .awaitingUpgradeDecision {
                if upgrade == .accept { rewriter.upgradeAccepted(into: &output) } else { rewriter.upgradeDeclined(into: &output) }
                deliver()
            }
        }

        while let buffer = Self.read(0) {
            for piece in Self.pieces(of: buffer, chunkSize) {
                rewriter.consume(piece, into: &output)
                deliver()
            }
        }
        rewriter.finish(into: &output)
        deliver()
        if let response {
            try maskResponse(response, masker: masker, audit: audit, blocked: &blocked)
        }
        if blocked || rewriter.status == .blocked { throw ExitCode(3) }
    }

    /// The next read of `fd` (up to 64 KiB, in its own storage: the engine keeps slices of
    /// what it holds), or nil at the end.
    static func read(_ fd: Int32) -> ByteBuffer? {
        var buffer = ByteBufferAllocator().buffer(capacity: 64 * 1024)
        let n = buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: 64 * 1024) { raw in
            var r: Int
            repeat { r = Glibc.read(fd, raw.baseAddress, raw.count) } while r < 0 && errno == EINTR
            return max(r, 0)
        }
        return n == 0 ? nil : buffer
    }

    /// `buffer` in pieces of `size` bytes (whole when nil), as `--chunk-size` asks.
    static func pieces(of buffer: ByteBuffer, _ size: Int?) -> [ByteBuffer] {
        guard let size else { return [buffer] }
        var rest = buffer
        var pieces: [ByteBuffer] = []
        while rest.readableBytes > 0 { pieces.append(rest.readSlice(length: min(size, rest.readableBytes))!) }
        return pieces
    }

    /// Feeds the response stream to the masker; what the guest would receive goes to stdout.
    private func maskResponse(_ path: String, masker: ResponseMasker, audit: AuditLine, blocked: inout Bool) throws {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { throw ValidationError("\(path): cannot open: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var output = MaskOutput()
        var failed = false
        func deliver() {
            for buffer in output.guest { StandardStream.write(1, buffer) }
            output.guest.removeAll(keepingCapacity: true)
            for event in output.events {
                Output.err(audit.json(event))
                if case .framingError = event { failed = true }
            }
            output.events.removeAll(keepingCapacity: true)
        }
        while !failed, let buffer = Self.read(fd) {
            for piece in Self.pieces(of: buffer, chunkSize) where !failed {
                masker.consume(piece, into: &output)
                deliver()
            }
        }
        if !failed {
            masker.finish(into: &output)
            deliver()
        }
        if failed { blocked = true }
    }
}

/// Audit events as JSON lines. Field set: BRIEF §2/§4; never a secret value, never a query.
struct AuditLine {
    var sandbox: String
    var sni: String?
    var action: ViolationAction

    func json(_ event: RewriteEvent) -> String {
        var fields: [(String, String?)] = [("sandbox", sandbox)]
        switch event {
        case .substituted(let secret, let site, let request):
            fields += [("event", "substituted"), ("secret", secret), ("site", site.rawValue)]
            fields += requestFields(request)
        case .violation(let violation):
            fields += [
                ("event", "violation"), ("secret", violation.secret), ("site", violation.site.rawValue),
                ("form", violation.form.rawValue), ("reason", violation.reason.rawValue), ("action", action.rawValue),
            ]
            fields += requestFields(violation.request)
        case .framingError(let error, let request):
            fields += [("event", "framing-error"), ("reason", error.rawValue), ("detail", error.explanation), ("action", "reset")]
            fields += requestFields(request)
        case .passedThrough(let secret, let site, let request):
            fields += [("event", "passed-through"), ("secret", secret), ("site", site.rawValue)]
            fields += requestFields(request)
        case .hostMismatch(let request):
            fields += [("event", "host-mismatch"), ("reason", sni == nil ? "authority-not-host" : "host-not-sni"), ("action", "reset")]
            fields += requestFields(request)
        }
        return "{" + fields.compactMap { key, value in value.map { "\"\(key)\":\(JSON.string($0))" } }.joined(separator: ",") + "}"
    }

    func json(_ event: MaskEvent) -> String {
        var fields: [(String, String?)] = [("sandbox", sandbox)]
        switch event {
        case .masked(let secret, let site, let form):
            fields += [("event", "masked"), ("secret", secret), ("site", site.rawValue), ("form", form.rawValue), ("sni", sni)]
        case .upgrade(let outcome):
            if case .accepted(let chosen) = outcome {
                fields += [("event", "upgrade-accepted"), ("detail", chosen ?? "CONNECT"), ("sni", sni)]
            } else {
                fields += [("event", "upgrade-declined"), ("sni", sni)]
            }
        case .framingError(let error, let detail):
            fields += [
                ("event", error == .valueInResponse ? "value-in-response" : "response-framing-error"), ("reason", error.rawValue),
                ("detail", error.explanation + " (" + detail + ")"), ("action", "reset"), ("sni", sni),
            ]
        }
        return "{" + fields.compactMap { key, value in value.map { "\"\(key)\":\(JSON.string($0))" } }.joined(separator: ",") + "}"
    }

    private func requestFields(_ request: RequestSummary?) -> [(String, String?)] {
        [("sni", sni), ("host", request?.host), ("method", request?.method), ("path", request?.path)]
    }
}

enum JSON {
    static func string(_ value: String) -> String { AuditRecord.quote(value) }
}

enum StandardStream {
    static func write(_ fd: Int32, _ buffer: ByteBuffer) {
        buffer.withUnsafeReadableBytes { _ = FileBytes.writeAll(fd, $0) }
    }
}
