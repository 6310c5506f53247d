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
    /// Input bytes the engine copied (only a request head split across reads is coalesced).
    public private(set) var copiedInputBytes = 0
    /// Bytes the engine produced: replacement values, rewritten lengths, chunk framing.
    public private(set) var insertedBytes = 0
    /// Input bytes forwarded as slices.
    public private(set) var forwardedBytes = 0
    /// Request heads parsed (pipelined and keep-alive requests each count).
    public private(set) var requests = 0

    public init() {}

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

    public init(identity: ConnectionIdentity, secrets: [Secret], configuration: RewriterConfiguration = RewriterConfiguration(), mode: Mode = .http) {
        core = RewriterCore(identity: identity, secrets: secrets, configuration: configuration, mode: mode)
    }

    public var identity: ConnectionIdentity { core.identity }
    public var configuration: RewriterConfiguration { core.configuration }
    public var status: Status { core.status }

    /// True while part of a request head has arrived but not all of it (the proxy bounds
    /// how long that may last: slowloris).
    public var isReadingHead: Bool { core.isReadingHead }

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

    /// While the status is `awaitingUpgradeDecision`: what to read the upstream's answer
    /// with (the held request's `Upgrade` protocols, or CONNECT).
    public var pendingUpgrade: UpgradeDecision? { core.pendingUpgrade }

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
    var scanner: StreamScanner
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
    var pendingUpgrade: UpgradeDecision?
    var webSocket = WebSocketStream()
    let allocator = ByteBufferAllocator()

    init(identity: ConnectionIdentity, secrets: [Secret], configuration: RewriterConfiguration, mode: Mode) {
        self.identity = identity
        self.configuration = configuration
        self.secrets = secrets.map(CompiledSecret.init)
        self.matcher = PlaceholderMatcher(placeholders: self.secrets.map(\.placeholder))
        self.rawValues = self.secrets.map { ByteBuffer(bytes: $0.raw) }
        self.percentValues = self.secrets.map { ByteBuffer(bytes: $0.percentEncoded) }
        self.sniBytes = Array((identity.sni ?? "").utf8)
        self.connectionDenial = self.secrets.map { secret in
            guard let sni = identity.sni else { return nil }
            return Self.denial(secret, host: sni, identity: identity)
        }
        self.scanner = StreamScanner(matcher: matcher)
        self.state = mode == .http ? .head : .relay(.opaque)
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

    private mutating func replayUpgradeHeld(_ output: inout RewriteOutput) {
        let held = upgradeHeld
        upgradeHeld = []
        upgradeHeldBytes = 0
        pendingUpgrade = nil
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

    // MARK: - Head

    private mutating func consumeHead(_ input: inout ByteBuffer, _ output: inout RewriteOutput) {
        let limit = configuration.maxHeaderBlock
        if var accumulated = headAccumulator {
            headAccumulator = nil  // one owner, so appending does not copy the storage
            // A head split across reads is coalesced into one buffer (bounded by the limit).
            let take = min(input.readableBytes, limit + 1 - accumulated.readableBytes)
            // Rescan only when the new bytes hold a control byte (a line end, or something to
            // reject) or complete a CR: the outcome is then the same as for one big read.
            let newBytesHaveControl = input.withUnsafeReadableBytes {
                ControlScanner.firstIndex(in: UnsafeRawBufferPointer(rebasing: $0.prefix(take)), from: 0) != nil
            }
            let previousCount = accumulated.readableBytes
            accumulated.writeImmutableBuffer(input.getSlice(at: input.readerIndex, length: take)!)
            var scan = RequestHead.LineScan.incomplete
            if newBytesHaveControl || accumulated.getInteger(at: accumulated.readerIndex + previousCount - 1, as: UInt8.self) == 0x0D {
                scan = accumulated.withUnsafeReadableBytes { head.scanLines($0) }
            }
            switch scan {
            case .error(let error):
                fail(error, &output)
            case .complete(let length):
                guard length <= limit else {
                    fail(.headerBlockTooLarge, &output)
                    return
                }
                // Give back what followed the head.
                let used = length - previousCount
                input.moveReaderIndex(forwardBy: used)
                output.noteCopied(used)
                accumulated.moveWriterIndex(to: accumulated.readerIndex + length)
                // A lone CRLF is an empty line between requests, split across reads.
                if head.lineCount > 1 { processHead(accumulated, &output) }
            case .incomplete:
                input.moveReaderIndex(forwardBy: take)
                output.noteCopied(take)
                if accumulated.readableBytes > limit {
                    fail(.headerBlockTooLarge, &output)
                } else {
                    headAccumulator = accumulated
                }
            }
            return
        }
        // Empty lines between requests are ignored (RFC 9112 §2.2).
        while input.readableBytes >= 2, input.getInteger(at: input.readerIndex, as: UInt16.self) == 0x0D0A {
            input.moveReaderIndex(forwardBy: 2)
        }
        guard input.readableBytes > 0 else { return }
        let window = min(input.readableBytes, limit)
        let scan = input.withUnsafeReadableBytes { head.scanLines(UnsafeRawBufferPointer(rebasing: $0.prefix(window))) }
        switch scan {
        case .error(let error):
            fail(error, &output)
        case .complete(let length):
            let head = input.readSlice(length: length)!
            if self.head.lineCount > 1 { processHead(head, &output) }
        case .incomplete:
            guard input.readableBytes <= limit else {
                fail(.headerBlockTooLarge, &output)
                return
            }
            var copy = allocator.buffer(capacity: max(4096, input.readableBytes * 2))
            output.noteCopied(input.readableBytes)
            copy.writeBuffer(&input)
            headAccumulator = copy
        }
    }

    private mutating func processHead(_ buffer: ByteBuffer, _ output: inout RewriteOutput) {
        headBuffer = buffer
        summary = nil
        edits.removeAll(keepingCapacity: true)
        if reported.count != secrets.count { reported = [UInt16](repeating: 0, count: secrets.count) }
        for i in reported.indices { reported[i] = 0 }

        var parseError: FramingError?
        var violation: Violation?
        var hostOK = true
        buffer.withUnsafeReadableBytes { b in
            do throws(FramingError) {
                try head.parse(b)
            } catch {
                parseError = error
                return
            }
            hostOK = computeRequestDenials(b)
            violation = rewriteHead(b)
            if head.upgrade { dropWebSocketExtensions(b) }
        }
        if let parseError {
            fail(parseError, &output)
            return
        }
        output.noteRequest()
        if let violation {
            block(violation, &output)
            return
        }
        if let problem = head.hostProblem {
            output.events.append(.framingError(problem, request: currentSummary()))
            state = .blocked
            return
        }
        if !hostOK {
            output.events.append(.hostMismatch(request: currentSummary()))
            state = .blocked
            return
        }

        // A body is a site of its own: what the previous request's body ended with is no
        // token boundary for a placeholder at the start of this one.
        scanner.startSite()
        if head.chunked {
            emitHead(&output)
            chunkLine.removeAll(keepingCapacity: true)
            chunkEnds.removeAll(keepingCapacity: true)
            segmentPieces.removeAll(keepingCapacity: true)
            segmentStart = scanner.position
            itemPosition = scanner.position
            segmentLength = 0
            state = .chunkSize
        } else if let length = head.contentLength, length > 0 {
            if bodyMaySubstitute() {
                guard length <= configuration.maxHeldBody else {
                    fail(.bodyTooLargeToSubstitute, &output)
                    return
                }
                if let expect = head.expectContinueField {
                    edits.append((head.fields[expect].line, ByteBuffer()))
                    output.continueToGuest = true
                }
                heldItems.removeAll(keepingCapacity: true)
                heldBytes = 0
                state = .heldBody(remaining: length)
            } else {
                emitHead(&output)
                state = .streamBody(remaining: length)
            }
        } else {
            emitHead(&output)
            finishRequest(&output)
        }
    }

    private mutating func finishRequest(_ output: inout RewriteOutput) {
        if case .blocked = state { return }
        state = (head.upgrade || head.isConnect) ? .awaitingUpgrade : .head
        if case .awaitingUpgrade = state {
            var protocols: String?
            headBuffer.withUnsafeReadableBytes { b in
                if let field = head.fields.first(where: { $0.kind == .upgrade }) {
                    protocols = String(decoding: UnsafeRawBufferPointer(rebasing: b[field.value]), as: UTF8.self)
                }
            }
            pendingUpgrade = UpgradeDecision(upgrade: protocols, connect: head.isConnect)
        }
        if case .head = state {
            // Nothing refers to this request any more: let go of its input, so the buffer the
            // next read lands in (NIOSSL reuses one) is not shared and need not be copied.
            headBuffer = ByteBuffer()
            summary = nil
        }
    }

    /// Keyhole reads the guest's WebSocket frames, so it offers the server no extension
    /// (`permessage-deflate` would compress them out of its sight): the
    /// `Sec-WebSocket-Extensions` lines of an upgrade request are dropped.
    private mutating func dropWebSocketExtensions(_ b: UnsafeRawBufferPointer) {
        for field in head.fields where field.name.count == 24 && RequestHead.equalsIgnoringCase(b, field.name, "sec-websocket-extensions") {
            guard !edits.contains(where: { $0.range.overlaps(field.line) }) else { continue }
            edits.append((field.line, ByteBuffer()))
        }
    }

    /// Per secret, why it may not be substituted in this request (nil: it may). Returns
    /// whether the host rules hold (see `hostRulesHold`).
    private mutating func computeRequestDenials(_ b: UnsafeRawBufferPointer) -> Bool {
        let hostOK = head.hostProblem == nil && hostRulesHold(b)
        requestDenial = connectionDenial
        guard hostOK else {
            for i in requestDenial.indices { requestDenial[i] = .hostMismatch }
            return false
        }
        if identity.isTLS { return true }
        // Plain HTTP: the Host header names the host; it must be pinned by DNS.
        let host = HostName.normalize(String(decoding: UnsafeRawBufferPointer(rebasing: b[head.host]), as: UTF8.self))
        for i in secrets.indices { requestDenial[i] = Self.denial(secrets[i], host: host, identity: identity) }
        return true
    }

    /// The Host equals the SNI (TLS); an absolute-form or CONNECT authority agrees with the
    /// Host. (`RequestHead.parse` already made sure there is exactly one, well formed.)
    private func hostRulesHold(_ b: UnsafeRawBufferPointer) -> Bool {
        if identity.isTLS, !Self.equalsHost(b, head.host, sniBytes), !Self.sameIPAddress(b, head.host, sniBytes) { return false }
        if let authorityHost = head.authorityHost, !Self.equalsHost(b, authorityHost, b, head.host) { return false }
        return true
    }

    /// Case-insensitive host comparison; a trailing dot on either side is ignored.
    static func equalsHost(_ b: UnsafeRawBufferPointer, _ range: Range<Int>, _ expected: [UInt8]) -> Bool {
        expected.withUnsafeBytes { e in equalsHost(b, range, e, 0..<e.count) }
    }

    /// IPv6 literals compare as addresses (`[2001:DB8:0::1]` is the SNI-less `2001:db8::1`).
    static func sameIPAddress(_ b: UnsafeRawBufferPointer, _ range: Range<Int>, _ expected: [UInt8]) -> Bool {
        guard let address = IPAddress(String(decoding: UnsafeRawBufferPointer(rebasing: b[range]), as: UTF8.self)),
            let other = IPAddress(String(decoding: expected, as: UTF8.self))
        else { return false }
        return address == other
    }

    static func equalsHost(_ a: UnsafeRawBufferPointer, _ ra: Range<Int>, _ b: UnsafeRawBufferPointer, _ rb: Range<Int>) -> Bool {
        var ra = ra
        var rb = rb
        if ra.count > 0, a[ra.upperBound - 1] == 0x2E { ra = ra.lowerBound..<(ra.upperBound - 1) }
        if rb.count > 0, b[rb.upperBound - 1] == 0x2E { rb = rb.lowerBound..<(rb.upperBound - 1) }
        guard ra.count == rb.count, ra.count > 0 else { return false }
        for k in 0..<ra.count {
            var x = a[ra.lowerBound + k]
            var y = b[rb.lowerBound + k]
            if x >= 0x41 && x <= 0x5A { x |= 0x20 }
            if y >= 0x41 && y <= 0x5A { y |= 0x20 }
            if x != y { return false }
        }
        return true
    }

    private mutating func bodyMaySubstitute() -> Bool {
        if head.contentEncoded { return false }
        for i in secrets.indices where secrets[i].inject.body && requestDenial[i] == nil { return true }
        return false
    }

    /// Finds placeholders in the head; records substitutions as edits. Returns the first
    /// violation, if any.
    private mutating func rewriteHead(_ b: UnsafeRawBufferPointer) -> Violation? {
        var i = 0
        var fieldIndex = 0
        while let c = matcher.nextCandidate(in: b, from: i) {
            guard case .match(let secret, let form, let length) = matcher.match(b, at: c, previous: c > 0 ? b[c - 1] : nil, final: true)
            else {
                i = c + 1
                continue
            }
            while fieldIndex < head.fields.count, head.fields[fieldIndex].line.upperBound <= c { fieldIndex += 1 }
            let site: Site
            if head.method.contains(c) {
                site = .method
            } else if head.target.contains(c) {
                site = head.query?.contains(c) == true ? .query : .path
            } else if fieldIndex < head.fields.count, head.fields[fieldIndex].name.contains(c) {
                site = .headerName
            } else {
                site = .header
            }
            switch decide(secret: secret, site: site, form: form) {
            case .failure(let violation):
                return violation
            case .success(let replacement):
                edits.append((c..<(c + length), replacement))
            }
            i = c + length
        }
        for field in head.fields where field.kind == .authorization {
            if let violation = rewriteBasicAuth(b, field.value) { return violation }
        }
        return nil
    }

    /// `Authorization: Basic base64(user:pass)`: decode, substitute, re-encode.
    private mutating func rewriteBasicAuth(_ b: UnsafeRawBufferPointer, _ value: Range<Int>) -> Violation? {
        guard value.count > 6, RequestHead.equalsIgnoringCase(b, value.lowerBound..<(value.lowerBound + 5), "basic"),
            b[value.lowerBound + 5] == 0x20
        else { return nil }
        var tokenStart = value.lowerBound + 6
        while tokenStart < value.upperBound, b[tokenStart] == 0x20 { tokenStart += 1 }
        let token = tokenStart..<value.upperBound
        guard let decoded = Base64.decode(UnsafeRawBufferPointer(rebasing: b[token])) else { return nil }
        var rebuilt: [UInt8] = []
        var changed = false
        var last = 0
        let violation: Violation? = decoded.withUnsafeBytes { d in
            var i = 0
            while let c = matcher.nextCandidate(in: d, from: i) {
                guard case .match(let secret, let form, let length) = matcher.match(d, at: c, previous: c > 0 ? d[c - 1] : nil, final: true)
                else {
                    i = c + 1
                    continue
                }
                guard form == .raw else {
                    return makeViolation(secret: secret, site: .basicAuth, form: .base64, reason: .encodedForm)
                }
                switch decide(secret: secret, site: .basicAuth, form: .raw) {
                case .failure(var violation):
                    violation.form = .base64
                    return violation
                case .success:
                    rebuilt.append(contentsOf: d[last..<c])
                    rebuilt.append(contentsOf: secrets[secret].raw)
                    last = c + length
                    changed = true
                }
                i = c + length
            }
            return nil
        }
        if let violation { return violation }
        if changed {
            rebuilt.append(contentsOf: decoded[last...])
            edits.append((token, ByteBuffer(bytes: Base64.encode(rebuilt))))
        }
        return nil
    }

    /// Substitute (the bytes to insert) or block (the violation).
    mutating func decide(secret: Int, site: Site, form: PlaceholderForm) -> Decision {
        let inject = secrets[secret].inject
        let reason: ViolationReason?
        switch site {
        case .method, .path, .headerName, .trailer, .upgraded, .opaque:
            reason = .neverSubstituted
        case .header, .query, .basicAuth, .body, .websocket:
            if let denial = requestDenial.isEmpty ? connectionDenial[secret] : requestDenial[secret] {
                reason = denial
            } else {
                switch site {
                case .header:
                    reason = !inject.headers ? .injectionDisabled : (form == .raw ? nil : .encodedForm)
                case .basicAuth:
                    reason = !inject.basicAuth ? .injectionDisabled : nil
                case .query:
                    reason = !inject.query ? .injectionDisabled : (form == .jsonEscaped ? .encodedForm : nil)
                case .websocket:
                    reason = !inject.body ? .injectionDisabled : (form == .raw ? nil : .encodedForm)
                default:  // body
                    if !inject.body {
                        reason = .injectionDisabled
                    } else if head.contentEncoded {
                        reason = .contentEncoded
                    } else if form == .jsonEscaped || (form == .percentEncoded && !head.formBody) {
                        reason = .encodedForm
                    } else {
                        reason = nil
                    }
                }
            }
        }
        if let reason { return .failure(makeViolation(secret: secret, site: site, form: form, reason: reason)) }
        let bit = UInt16(1) << Self.bit(site)
        if reported[secret] & bit == 0 {
            reported[secret] |= bit
            pendingSubstitutionEvents.append((secret, site))
        }
        let percent = site == .query || (site == .body && head.formBody)
        return .success(percent ? percentValues[secret] : rawValues[secret])
    }

    var pendingSubstitutionEvents: [(Int, Site)] = []

    enum Decision {
        case success(ByteBuffer)
        case failure(Violation)
    }

    static func bit(_ site: Site) -> UInt16 {
        switch site {
        case .header: return 0
        case .basicAuth: return 1
        case .query: return 2
        case .body: return 3
        case .websocket: return 5
        default: return 4
        }
    }

    mutating func makeViolation(secret: Int, site: Site, form: PlaceholderForm, reason: ViolationReason) -> Violation {
        Violation(secret: secrets[secret].env, site: site, form: form, reason: reason, request: currentSummary())
    }

    mutating func currentSummary() -> RequestSummary? {
        if let summary { return summary }
        guard head.method.count > 0, head.method.upperBound <= headBuffer.readableBytes else { return nil }
        var host: Range<Int>?
        if head.hostCount == 1, let field = head.hostField { host = head.fields[field].value }
        let made = RequestSummary(head: headBuffer, method: head.method, path: head.isConnect ? head.target : head.path, host: host)
        summary = made
        return made
    }

    mutating func flushSubstitutionEvents(_ output: inout RewriteOutput) {
        guard !pendingSubstitutionEvents.isEmpty else { return }
        let request = currentSummary() ?? RequestSummary(method: "", path: "", host: nil)
        for (secret, site) in pendingSubstitutionEvents {
            output.events.append(.substituted(secret: secrets[secret].env, site: site, request: request))
        }
        pendingSubstitutionEvents.removeAll(keepingCapacity: true)
    }

    /// Emits the head with its edits applied: unchanged spans as slices.
    private mutating func emitHead(_ output: inout RewriteOutput, contentLength: Int? = nil) {
        if let contentLength {
            // Replace the first Content-Length value, drop any repeats.
            var first = true
            for field in head.fields where field.kind == .contentLength {
                if first {
                    edits.append((field.value, ByteBuffer(string: String(contentLength))))
                    first = false
                } else {
                    edits.append((field.line, ByteBuffer()))
                }
            }
        }
        if edits.count > 1 { edits.sort { $0.range.lowerBound < $1.range.lowerBound } }
        var position = 0
        let base = headBuffer.readerIndex
        for edit in edits {
            if edit.range.lowerBound > position {
                output.forward(headBuffer.getSlice(at: base + position, length: edit.range.lowerBound - position)!)
            }
            output.insert(edit.replacement)
            position = edit.range.upperBound
        }
        if position < headBuffer.readableBytes {
            output.forward(headBuffer.getSlice(at: base + position, length: headBuffer.readableBytes - position)!)
        }
        edits.removeAll(keepingCapacity: true)
        flushSubstitutionEvents(&output)
    }

    // MARK: - Bodies

    /// Forwards decided bytes; any placeholder is a violation (nothing here substitutes).
    private mutating func drainStreaming(final: Bool, site: Site, _ output: inout RewriteOutput) {
        items.removeAll(keepingCapacity: true)
        scanner.drain(final: final, into: &items)
        for item in items {
            switch item {
            case .data(let slice):
                output.forward(slice)
            case .match(let secret, let form, _):
                if case .failure(let violation) = decide(secret: secret, site: site, form: form) {
                    block(violation, &output)
                } else {
                    // Streaming is chosen only when no secret may be substituted in the body.
                    block(makeViolation(secret: secret, site: site, form: form, reason: .injectionDisabled), &output)
                }
                return
            }
        }
    }

    private mutating func completeHeldBody(_ output: inout RewriteOutput) {
        scanner.drain(final: true, into: &heldItems)
        var pieces: [(ByteBuffer, Bool)] = []
        pieces.reserveCapacity(heldItems.count)
        var length = 0
        for item in heldItems {
            switch item {
            case .data(let slice):
                pieces.append((slice, false))
                length += slice.readableBytes
            case .match(let secret, let form, _):
                switch decide(secret: secret, site: .body, form: form) {
                case .failure(let violation):
                    heldItems.removeAll()
                    block(violation, &output)
                    return
                case .success(let replacement):
                    pieces.append((replacement, true))
                    length += replacement.readableBytes
                }
            }
        }
        heldItems.removeAll(keepingCapacity: true)
        emitHead(&output, contentLength: length == heldBytes ? nil : length)
        for (piece, inserted) in pieces {
            if inserted { output.insert(piece) } else { output.forward(piece) }
        }
        finishRequest(&output)
    }

    // MARK: - Chunked

    private mutating func consumeChunkSizeLine(_ input: inout ByteBuffer, _ output: inout RewriteOutput) {
        let lf = input.withUnsafeReadableBytes { bytes -> Int? in
            guard let base = bytes.baseAddress, let hit = memchr(base, 0x0A, bytes.count) else { return nil }
            return base.distance(to: UnsafeRawPointer(hit))
        }
        let take = (lf ?? (input.readableBytes - 1)) + 1
        guard chunkLine.count + take <= 4096 else {
            fail(.malformedChunk, &output)
            return
        }
        input.withUnsafeReadableBytes { chunkLine.append(contentsOf: $0.prefix(take)) }
        input.moveReaderIndex(forwardBy: take)
        guard lf != nil else { return }
        guard let size = Self.parseChunkSize(chunkLine) else {
            fail(.malformedChunk, &output)
            return
        }
        chunkLine.removeAll(keepingCapacity: true)
        if size == 0 {
            trailerBuffer = nil
            state = .trailers
        } else {
            // Every earlier chunk's data has been handed to the scanner, so this chunk
            // starts where that data ends.
            chunkEnds.append(scanner.position + scanner.pendingByteCount + size)
            state = .chunkData(remaining: size)
        }
    }

    /// `HEX[;ext]CRLF`. Extensions are dropped when re-framing; they may not carry controls.
    static func parseChunkSize(_ line: [UInt8]) -> Int? {
        guard line.count >= 3, line[line.count - 2] == 0x0D, line[line.count - 1] == 0x0A else { return nil }
        var size = 0
        var digits = 0
        var i = 0
        while i < line.count - 2, let h = PlaceholderMatcher.hexValue(line[i]) {
            guard digits < 15 else { return nil }
            size = size << 4 | Int(h)
            digits += 1
            i += 1
        }
        guard digits > 0 else { return nil }
        while i < line.count - 2, line[i] == 0x20 || line[i] == 0x09 { i += 1 }
        if i < line.count - 2 {
            guard line[i] == 0x3B else { return nil }  // ';'
            for byte in line[i..<(line.count - 2)] where (byte < 0x20 && byte != 0x09) || byte == 0x7F { return nil }
        }
        return size
    }

    /// Turns decided items into chunks whose boundaries depend only on the input's chunk
    /// sizes and `chunkSegment`, never on how the bytes arrived.
    private mutating func reframe(final: Bool, _ output: inout RewriteOutput) {
        items.removeAll(keepingCapacity: true)
        scanner.drain(final: final, into: &items)
        for item in items {
            switch item {
            case .data(var slice):
                while slice.readableBytes > 0 {
                    guard let end = segmentEnd() else { break }
                    if itemPosition >= end {
                        closeSegment(end, &output)
                        continue
                    }
                    let take = min(slice.readableBytes, end - itemPosition)
                    segmentPieces.append((slice.readSlice(length: take)!, false))
                    segmentLength += take
                    itemPosition += take
                }
            case .match(let secret, let form, let length):
                while let end = segmentEnd(), itemPosition >= end { closeSegment(end, &output) }
                switch decide(secret: secret, site: .body, form: form) {
                case .failure(let violation):
                    block(violation, &output)
                    return
                case .success(let replacement):
                    segmentPieces.append((replacement, true))
                    segmentLength += replacement.readableBytes
                    itemPosition += length
                }
            }
        }
        while let end = segmentEnd(), end <= scanner.position { closeSegment(end, &output) }
    }

    private mutating func segmentEnd() -> Int? {
        guard let chunkEnd = chunkEnds.first else { return nil }
        return min(segmentStart + configuration.chunkSegment, chunkEnd)
    }

    private mutating func closeSegment(_ end: Int, _ output: inout RewriteOutput) {
        if segmentLength > 0 {
            output.insert(ByteBuffer(string: String(segmentLength, radix: 16, uppercase: true) + "\r\n"))
            var substituted = false
            for (piece, inserted) in segmentPieces {
                if inserted {
                    output.insert(piece)
                    substituted = true
                } else {
                    output.forward(piece)
                }
            }
            output.insert(ByteBuffer(string: "\r\n"))
            // A real value just left: say so now, even if the request is cut short later.
            if substituted { flushSubstitutionEvents(&output) }
        }
        segmentPieces.removeAll(keepingCapacity: true)
        segmentLength = 0
        segmentStart = end
        if end == chunkEnds.first { chunkEnds.removeFirst() }
    }

    private mutating func consumeTrailers(_ input: inout ByteBuffer, _ output: inout RewriteOutput) {
        var trailers = trailerBuffer ?? allocator.buffer(capacity: 64)
        trailerBuffer = nil  // one owner, so appending does not copy what came before
        // Copy until the trailer block ends (an empty line); trailers are small and rare.
        var end: Int?
        while let byte = input.readInteger(as: UInt8.self) {
            trailers.writeInteger(byte)
            output.noteCopied(1)
            let n = trailers.readableBytes
            if byte == 0x0A {
                if n == 2 || (n >= 4 && trailers.getInteger(at: trailers.readerIndex + n - 4, as: UInt32.self) == 0x0D0A_0D0A) {
                    end = n
                    break
                }
            }
            if n > configuration.maxTrailers {
                fail(.trailersTooLarge, &output)
                return
            }
        }
        guard end != nil else {
            trailerBuffer = trailers
            return
        }
        trailerBuffer = nil
        // Validate and scan the trailer lines like header lines; placeholders there are
        // never substituted.
        var problem: FramingError?
        var violation: Violation?
        trailers.withUnsafeReadableBytes { b in
            var lineStart = 0
            var searchFrom = 0
            while let i = ControlScanner.firstIndex(in: b, from: searchFrom) {
                switch b[i] {
                case 0x0A:
                    guard i > lineStart, b[i - 1] == 0x0D else {
                        problem = .bareLF
                        return
                    }
                    let content = lineStart..<(i - 1)
                    if !content.isEmpty {
                        if b[content.lowerBound] == 0x20 || b[content.lowerBound] == 0x09 { problem = .obsFold }
                        var k = content.lowerBound
                        while k < content.upperBound, RequestHead.isToken(b[k]) { k += 1 }
                        if k == content.lowerBound || k == content.upperBound || b[k] != 0x3A { problem = .invalidHeaderName }
                    }
                    lineStart = i + 1
                case 0x0D:
                    if i + 1 >= b.count || b[i + 1] != 0x0A { problem = .bareCR }
                case 0x09:
                    break
                case 0x00:
                    problem = .nulByte
                default:
                    problem = .controlCharacter
                }
                if problem != nil { return }
                searchFrom = i + 1
            }
            var i = 0
            while let c = matcher.nextCandidate(in: b, from: i) {
                if case .match(let secret, let form, _) = matcher.match(b, at: c, previous: c > 0 ? b[c - 1] : nil, final: true) {
                    violation = makeViolation(secret: secret, site: .trailer, form: form, reason: .neverSubstituted)
                    return
                }
                i = c + 1
            }
        }
        if let problem {
            fail(problem, &output)
            return
        }
        if let violation {
            block(violation, &output)
            return
        }
        reframe(final: true, &output)
        if case .blocked = state { return }
        while let end = segmentEnd() { closeSegment(end, &output) }
        output.insert(ByteBuffer(string: "0\r\n"))
        output.insert(trailers)
        flushSubstitutionEvents(&output)
        finishRequest(&output)
    }
}
