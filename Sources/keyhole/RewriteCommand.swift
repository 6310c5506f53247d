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
        let rewriter = RequestRewriter(identity: connection, secrets: loaded.secrets, configuration: configuration)
        let audit = AuditLine(sandbox: loaded.name, sni: plain ? nil : host, action: loaded.network.onSecretViolation)

        var output = RewriteOutput()
        var blocked = false
        func deliver() {
            for buffer in output.upstream { StandardStream.write(1, buffer) }
            output.upstream.removeAll(keepingCapacity: true)
            for event in output.events {
                Output.err(audit.json(event))
                if case .substituted = event { continue }
                blocked = true
            }
            output.events.removeAll(keepingCapacity: true)
            if rewriter.status == .awaitingUpgradeDecision {
                if upgrade == .accept { rewriter.upgradeAccepted(into: &output) } else { rewriter.upgradeDeclined(into: &output) }
                deliver()
            }
        }

        var buffer = ByteBufferAllocator().buffer(capacity: 64 * 1024)
        while true {
            buffer.clear()
            let n = buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: 64 * 1024) { raw in
                var r: Int
                repeat { r = read(0, raw.baseAddress, raw.count) } while r < 0 && errno == EINTR
                return max(r, 0)
            }
            if n == 0 { break }
            if let chunkSize {
                var rest = buffer
                while rest.readableBytes > 0 {
                    let piece = rest.readSlice(length: min(chunkSize, rest.readableBytes))!
                    rewriter.consume(piece, into: &output)
                    deliver()
                }
            } else {
                rewriter.consume(buffer, into: &output)
                deliver()
            }
            // The engine keeps slices of what it holds; give the next read its own storage.
            buffer = ByteBufferAllocator().buffer(capacity: 64 * 1024)
        }
        rewriter.finish(into: &output)
        deliver()
        if blocked || rewriter.status == .blocked { throw ExitCode(3) }
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
        case .hostMismatch(let request):
            fields += [("event", "host-mismatch"), ("reason", sni == nil ? "authority-not-host" : "host-not-sni"), ("action", "reset")]
            fields += requestFields(request)
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
