public import KeyholePolicy
public import NIOCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// What the proxy knows about the connection's peer, established before any real value
/// may be written (BRIEF §4 identity (a)–(d)).
public struct ConnectionIdentity: Sendable, Hashable {
    /// The TLS server name the guest sent; nil for plain HTTP.
    public var sni: String?
    /// Names (normalized) whose observed, unexpired DNS answers contained the address the
    /// guest connected to.
    public var dnsPinnedNames: Set<String>
    /// The upstream's certificate chain verified for the SNI name.
    public var upstreamVerified: Bool

    public init(sni: String?, dnsPinnedNames: Set<String>, upstreamVerified: Bool) {
        self.sni = sni.map { HostName.normalize($0) }
        self.dnsPinnedNames = Set(dnsPinnedNames.map { HostName.normalize($0) })
        self.upstreamVerified = upstreamVerified
    }

    /// TLS to `sni`, pinned by DNS and verified upstream: the state in which secrets flow.
    public static func verifiedTLS(sni: String) -> ConnectionIdentity {
        ConnectionIdentity(sni: sni, dnsPinnedNames: [sni], upstreamVerified: true)
    }

    public var isTLS: Bool { sni != nil }
}

public struct RewriterConfiguration: Sendable, Hashable {
    /// Largest request head (request line + headers) accepted.
    public var maxHeaderBlock: Int
    /// Largest `Content-Length` body held for substitution; larger ones are rejected.
    public var maxHeldBody: Int
    /// Largest trailer block of a chunked body.
    public var maxTrailers: Int
    /// Longest stretch of one chunk re-emitted as a single chunk (bounds memory when a
    /// client sends huge chunks).
    public var chunkSegment: Int
    /// Most bytes held after an upgrade request until the upstream's answer decides it.
    public var maxUpgradeHold: Int
    /// Ask for responses without a content coding (`Accept-Encoding: identity`): set where
    /// responses are masked, so they stay readable.
    public var identityResponses = false
    /// The upstream connection may outlive the guest's (the proxy pools it): a guest's
    /// `Connection: close` is taken off the request that goes upstream, and its response is
    /// marked `closeAfter` (the proxy closes the guest after it, and tells the guest so).
    public var keepUpstreamAlive = false

    public init(
        maxHeaderBlock: Int = 64 * 1024, maxHeldBody: Int = 64 * 1024 * 1024, maxTrailers: Int = 64 * 1024, chunkSegment: Int = 64 * 1024,
        maxUpgradeHold: Int = 1024 * 1024
    ) {
        self.maxUpgradeHold = maxUpgradeHold
        self.maxHeaderBlock = maxHeaderBlock
        self.maxHeldBody = maxHeldBody
        self.maxTrailers = maxTrailers
        self.chunkSegment = chunkSegment
    }
}

/// Where the engine puts what it decided. The caller drains `upstream` and `events` after
/// each call; counters accumulate.
public struct RewriteOutput {
    /// Bytes for the upstream, in order. Unchanged input travels as slices of the input.
    public var upstream: [ByteBuffer] = []
    public var events: [RewriteEvent] = []
    /// Write `HTTP/1.1 100 Continue` to the guest: the engine holds a body the guest will
    /// only send after it (the `Expect` header is not forwarded).
    public var continueToGuest = false
    /// One per request sent upstream, in order: how to read its response.
    public var expectedResponses: [ExpectedResponse] = []
    /// Input bytes the engine copied (only a request head split across reads is coalesced).
    public private(set) var copiedInputBytes = 0
    /// Bytes the engine produced: replacement values, rewritten lengths, chunk framing.
    public private(set) var insertedBytes = 0
    /// Input bytes forwarded as slices.
    public private(set) var forwardedBytes = 0
    /// Request heads parsed (pipelined and keep-alive requests each count).
    public private(set) var requests = 0

    public init() {}

    /// Gives back the capacity of the arrays the caller has drained (a quiet connection);
    /// the counters stay.
    public mutating func releaseDrainedCapacity() {
        if upstream.isEmpty { upstream = [] }
        if events.isEmpty { events = [] }
        if expectedResponses.isEmpty { expectedResponses = [] }
    }

    @inline(__always)
    mutating func forward(_ slice: ByteBuffer) {
        guard slice.readableBytes > 0 else { return }
        forwardedBytes += slice.readableBytes
        upstream.append(slice)
    }

    @inline(__always)
    mutating func insert(_ bytes: ByteBuffer) {
        guard bytes.readableBytes > 0 else { return }
        insertedBytes += bytes.readableBytes
        upstream.append(bytes)
    }

    mutating func noteCopied(_ count: Int) { copiedInputBytes += count }

    mutating func noteRequest() { requests += 1 }
}

/// The substitution engine for one connection's guest → upstream byte stream (HTTP/1.x).
///
/// Pure: bytes in, bytes and decisions out. Feed it the stream in any split; the bytes it
/// emits do not depend on the split. After a violation or framing error it emits nothing
/// more and the caller resets the connection.
public final class RequestRewriter {
    // All state lives in one struct: one exclusivity check per call instead of one per
    // field access (a measurable share of a 1 KiB request's cost).
    @exclusivity(unchecked) var core: RewriterCore

    /// `secrets`: the policy's, compiled once and shared by its connections.
    /// `heldBodyBudget`: shared by the connections of a process; nil means no budget beyond
    /// `configuration.maxHeldBody` per body.
    public init(
        identity: ConnectionIdentity, secrets: SecretSet, configuration: RewriterConfiguration = RewriterConfiguration(), mode: Mode = .http,
        heldBodyBudget: HeldBodyBudget? = nil
    ) {
        core = RewriterCore(identity: identity, secrets: secrets, configuration: configuration, mode: mode)
        core.heldBodyBudget = heldBodyBudget
    }

    /// The same, compiling `secrets` for this rewriter alone (tools and tests).
    public convenience init(
        identity: ConnectionIdentity, secrets: [Secret], configuration: RewriterConfiguration = RewriterConfiguration(), mode: Mode = .http,
        heldBodyBudget: HeldBodyBudget? = nil
    ) {
        self.init(identity: identity, secrets: SecretSet(secrets), configuration: configuration, mode: mode, heldBodyBudget: heldBodyBudget)
    }

    deinit {
        core.releaseHeldBody()
        core.releaseWebSocketReservation()
    }

    public var identity: ConnectionIdentity { core.identity }
    public var configuration: RewriterConfiguration { core.configuration }
    public var status: Status { core.status }

    /// True while part of a request head has arrived but not all of it (the proxy bounds
    /// how long that may last: slowloris).
    public var isReadingHead: Bool { core.isReadingHead }

    /// Between requests: every request so far went upstream whole, and nothing of the next
    /// one has arrived (no head, no body, no upgrade pending).
    public var betweenRequests: Bool {
        guard case .head = core.state else { return false }
        return core.headAccumulator == nil
    }

    /// A quiet connection between requests gives back the capacity its per-request scratch
    /// kept (the head's line table, edits, body pieces): the next request allocates it
    /// again. Connection state stays. Does nothing unless `betweenRequests`.
    public func releaseIdleCapacity() {
        core.releaseIdleCapacity()
    }

    /// Consumes the next bytes the guest sent.
    public func consume(_ buffer: ByteBuffer, into output: inout RewriteOutput) {
        core.consume(buffer, into: &output)
    }

    /// The guest closed its side. Flushes what can be flushed; a request cut short is
    /// reported and not completed.
    public func finish(into output: inout RewriteOutput) {
        core.finish(into: &output)
    }

    /// The upstream answered the held `Upgrade`/`CONNECT` request with 101 (or 2xx for
    /// CONNECT): from now on bytes are relayed and scanned, never substituted; for a
    /// `websocket` 101, the guest's frames are parsed and their text messages substituted.
    public func upgradeAccepted(websocket: Bool = false, into output: inout RewriteOutput) {
        core.upgradeAccepted(websocket: websocket, into: &output)
    }

    /// The upstream refused the upgrade: keep parsing HTTP requests.
    public func upgradeDeclined(into output: inout RewriteOutput) {
        core.upgradeDeclined(into: &output)
    }

    /// Bytes the guest sent after the upgrade request, held until the decision.
    public var heldUpgradeBytes: Int { core.upgradeHeldBytes }

    public enum Mode: Sendable {
        /// Parse HTTP/1.x requests.
        case http
        /// Not HTTP: relay everything, scanning for placeholders.
        case opaque
    }

    public enum Status: Sendable, Equatable {
        case open
        /// An `Upgrade` or `CONNECT` request was sent; further guest bytes are held until
        /// the caller says how the upstream answered.
        case awaitingUpgradeDecision
        /// A violation or framing error: reset the connection.
        case blocked
    }
}

struct RewriterCore {
    typealias Mode = RequestRewriter.Mode
    typealias Status = RequestRewriter.Status

    enum State {
        case head
        case streamBody(remaining: Int)
        case heldBody(remaining: Int)
        case chunkSize
        case chunkData(remaining: Int)
        case chunkDataEnd(seen: Int)
        case trailers
        case awaitingUpgrade
        case relay(Site)
        /// After a 101 for `websocket`: the guest's frames, parsed.
        case websocket
        case blocked
    }

    let identity: ConnectionIdentity
    let configuration: RewriterConfiguration
    let secrets: [CompiledSecret]
    let matcher: PlaceholderMatcher
    let rawValues: [ByteBuffer]
    let percentValues: [ByteBuffer]
    /// Per secret: why it may not be substituted on this connection at all (TLS only; plain
    /// HTTP decides per request from the Host header).
    let connectionDenial: [ViolationReason?]
    let sniBytes: [UInt8]

    var state: State
    var scanner: StreamScanner<PlaceholderMatcher>
    // Current request.
    var head = RequestHead()
    var headBuffer = ByteBuffer()
    var headAccumulator: ByteBuffer?
    var requestDenial: [ViolationReason?] = []
    var reported: [UInt16] = []
    var summary: RequestSummary?
    var edits: [(range: Range<Int>, replacement: ByteBuffer)] = []
    var heldItems: [StreamItem] = []
    var heldBytes = 0
    var items: [StreamItem] = []
    // Chunked re-framing.
    var chunkLine: [UInt8] = []
    var chunkEnds: [Int] = []
    var segmentStart = 0
    /// Pieces of the chunk being built; `true` marks a replacement value.
    var segmentPieces: [(ByteBuffer, Bool)] = []
    var segmentLength = 0
    var itemPosition = 0
    var trailerBuffer: ByteBuffer?
    // Upgrade.
    var upgradeHeld: [ByteBuffer] = []
    var upgradeHeldBytes = 0
    var webSocket = WebSocketStream()
    var heldBodyBudget: HeldBodyBudget?
    /// What this connection holds of the budget (the body being held).
    var heldBodyReserved = 0
    /// Substitutions of the current request not yet reported (reported once its head is out).
    var pendingSubstitutionEvents: [(Int, Site, passedThrough: Bool)] = []
    /// The current request asked to close, and its `Connection` lines were taken off
    /// (`configuration.keepUpstreamAlive`).
    var closeAfter = false
    /// A request that asked to close went upstream whole: what the guest sends after it
    /// is not a request anybody reads (RFC 9112 §9.6), so it goes nowhere.
    var closed = false
    let allocator = ByteBufferAllocator()

    init(identity: ConnectionIdentity, secrets: SecretSet, configuration: RewriterConfiguration, mode: Mode) {
        self.identity = identity
        self.configuration = configuration
        self.secrets = secrets.secrets
        self.matcher = secrets.placeholders
        self.rawValues = secrets.rawValues
        self.percentValues = secrets.percentValues
        self.sniBytes = Array((identity.sni ?? "").utf8)
        self.connectionDenial = self.secrets.map { secret in
            guard let sni = identity.sni else { return nil }
            return Self.denial(secret, host: sni, identity: identity)
        }
        self.scanner = StreamScanner(matcher: matcher)
        self.state = mode == .http ? .head : .relay(.opaque)
    }

    mutating func releaseIdleCapacity() {
        guard case .head = state, headAccumulator == nil, heldItems.isEmpty, pendingSubstitutionEvents.isEmpty, upgradeHeld.isEmpty
        else { return }
        head = RequestHead()
        headBuffer = ByteBuffer()
        edits = []
        items = []
        heldItems = []
        chunkLine = []
        chunkEnds = []
        segmentPieces = []
        pendingSubstitutionEvents = []
        scanner.releaseIdleCapacity()
    }

    var isReadingHead: Bool {
        if case .head = state { return headAccumulator != nil }
        return false
    }

    var status: Status {
        switch state {
        case .blocked: return .blocked
        case .awaitingUpgrade: return .awaitingUpgradeDecision
        default: return .open
        }
    }

    /// Why `secret` may not be substituted for requests to `host` on this connection.
    static func denial(_ secret: CompiledSecret, host: String, identity: ConnectionIdentity) -> ViolationReason? {
        if !secret.allowedHosts.allows(host) { return .hostNotAllowed }
        if !identity.dnsPinnedNames.contains(HostName.normalize(host)) { return .dnsNotPinned }
        if secret.requireTLSIdentity {
            if !identity.isTLS { return .plainHTTP }
            if !identity.upstreamVerified { return .upstreamUnverified }
        }
        return nil
    }

    // MARK: - Driving

    mutating func consume(_ buffer: ByteBuffer, into output: inout RewriteOutput) {
        var input = buffer
        while input.readableBytes > 0 {
            switch state {
            case .blocked:
                return
            case .awaitingUpgrade:
                // The proxy stops reading while it waits; this bounds what a guest can make
                // it hold if it does not.
                upgradeHeldBytes += input.readableBytes
                guard upgradeHeldBytes <= configuration.maxUpgradeHold else {
                    upgradeHeld = []
                    fail(.upgradeHoldExceeded, &output)
                    return
                }
                upgradeHeld.append(input)
                return
            case .head:
                consumeHead(&input, &output)
            case .streamBody(let remaining):
                let n = min(remaining, input.readableBytes)
                scanner.append(input.readSlice(length: n)!)
                state = .streamBody(remaining: remaining - n)
                drainStreaming(final: remaining == n, site: .body, &output)
                if case .streamBody(0) = state { finishRequest(&output) }
            case .heldBody(let remaining):
                let n = min(remaining, input.readableBytes)
                scanner.append(input.readSlice(length: n)!)
                heldBytes += n
                state = .heldBody(remaining: remaining - n)
                if remaining == n {
                    completeHeldBody(&output)
                } else {
                    scanner.drain(final: false, into: &heldItems)
                }
            case .chunkSize:
                consumeChunkSizeLine(&input, &output)
            case .chunkData(let remaining):
                let n = min(remaining, input.readableBytes)
                scanner.append(input.readSlice(length: n)!)
                state = remaining == n ? .chunkDataEnd(seen: 0) : .chunkData(remaining: remaining - n)
                reframe(final: false, &output)
            case .chunkDataEnd(let seen):
                let expected: UInt8 = seen == 0 ? 0x0D : 0x0A
                guard input.readInteger(as: UInt8.self) == expected else {
                    fail(.malformedChunk, &output)
                    return
                }
                state = seen == 0 ? .chunkDataEnd(seen: 1) : .chunkSize
            case .trailers:
                consumeTrailers(&input, &output)
            case .relay(let site):
                scanner.append(input)
                input.moveReaderIndex(forwardBy: input.readableBytes)
                drainStreaming(final: false, site: site, &output)
            case .websocket:
                consumeWebSocket(&input, &output)
            }
        }
    }

    mutating func finish(into output: inout RewriteOutput) {
        switch state {
        case .blocked:
            return
        case .head:
            if headAccumulator != nil {
                output.events.append(.framingError(.incompleteRequest, request: nil))
                headAccumulator = nil
            }
        case .relay(let site):
            drainStreaming(final: true, site: site, &output)
        case .websocket:
            finishWebSocket(&output)
        case .awaitingUpgrade:
            break
        case .streamBody:
            drainStreaming(final: true, site: .body, &output)
            if case .blocked = state { return }
            output.events.append(.framingError(.incompleteRequest, request: currentSummary()))
        case .heldBody, .chunkSize, .chunkData, .chunkDataEnd, .trailers:
            output.events.append(.framingError(.incompleteRequest, request: currentSummary()))
        }
    }

    mutating func upgradeAccepted(websocket: Bool, into output: inout RewriteOutput) {
        guard case .awaitingUpgrade = state else { return }
        if websocket && !head.isConnect {
            state = .websocket
            webSocket = WebSocketStream()
        } else {
            state = .relay(.upgraded)
        }
        replayUpgradeHeld(&output)
    }

    mutating func upgradeDeclined(into output: inout RewriteOutput) {
        guard case .awaitingUpgrade = state else { return }
        state = .head
        replayUpgradeHeld(&output)
    }

    mutating func replayUpgradeHeld(_ output: inout RewriteOutput) {
        let held = upgradeHeld
        upgradeHeld = []
        upgradeHeldBytes = 0
        for buffer in held { consume(buffer, into: &output) }
    }

    mutating func fail(_ error: FramingError, _ output: inout RewriteOutput) {
        // While a head is being read there is no parsed request to name.
        let request: RequestSummary?
        if case .head = state { request = nil } else { request = currentSummary() }
        output.events.append(.framingError(error, request: request))
        state = .blocked
    }

    mutating func block(_ violation: Violation, _ output: inout RewriteOutput) {
        output.events.append(.violation(violation))
        state = .blocked
    }
}
