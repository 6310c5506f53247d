public import KeyholePolicy
public import NIOCore

/// What the guest asked for, in order: each response is read with the framing its request
/// implies (RFC 9112 §6.3) and an upgrade is decided from the pair.
public struct ExpectedResponse: Sendable, Equatable {
    public var isHead: Bool
    public var isConnect: Bool
    /// The protocols an `Upgrade` request asked for (lower-cased tokens), empty otherwise.
    public var upgrade: [String]
    /// An HTTP/1.0 request (its response cannot be re-framed as chunked).
    public var http10: Bool
    /// The guest asked to close after this request, and Keyhole took that off the request
    /// it sent upstream (`RewriterConfiguration.keepUpstreamAlive`): the response says
    /// `Connection: close` to the guest, and the proxy closes the guest after it.
    public var closeAfter: Bool
    /// The request went upstream asking it to close (`Connection: close` left in place).
    public var upstreamCloses: Bool

    public init(
        isHead: Bool = false, isConnect: Bool = false, upgrade: [String] = [], http10: Bool = false, closeAfter: Bool = false,
        upstreamCloses: Bool = false
    ) {
        self.isHead = isHead
        self.isConnect = isConnect
        self.upgrade = upgrade
        self.http10 = http10
        self.closeAfter = closeAfter
        self.upstreamCloses = upstreamCloses
    }

    var asksToSwitch: Bool { isConnect || !upgrade.isEmpty }
}

/// Where a value came back.
public enum MaskSite: String, Sendable, Hashable {
    case head = "response-head"
    case body = "response-body"
    case websocket = "websocket-message"
    case upgraded = "upgraded-stream"
}

/// Why a response could not be read (the connection is reset).
public enum ResponseFramingError: String, Sendable, Hashable, Error {
    case malformedHead = "malformed-response-head"
    case headTooLarge = "response-head-too-large"
    case conflictingLength = "conflicting-content-length"
    case malformedChunk = "malformed-response-chunk"
    case unrequestedSwitch = "unrequested-101"
    case websocketProtocol = "websocket-protocol-error"
    /// A response that may carry a value in a form Keyhole cannot read (an encoding it does
    /// not decode): never forwarded.
    case valueInResponse = "value-in-response"
    /// A compressed body that does not decode, or decodes to far more than it could be.
    case undecodableBody = "undecodable-response-body"

    public var explanation: String {
        switch self {
        case .malformedHead: return "the upstream's response head is not HTTP/1.x"
        case .headTooLarge: return "the upstream's response head is larger than 64 KiB"
        case .conflictingLength: return "the upstream's response has conflicting Content-Length values"
        case .malformedChunk: return "the upstream's chunked response is malformed"
        case .unrequestedSwitch: return "the upstream switched protocols without being asked (or to another protocol)"
        case .websocketProtocol: return "the upstream's WebSocket frames break RFC 6455"
        case .valueInResponse: return "the response is in an encoding Keyhole cannot mask, on a connection where a real value may have gone upstream"
        case .undecodableBody: return "the response's gzip or deflate body is corrupt, or decodes to more than 100 times its size"
        }
    }
}

public enum MaskEvent: Sendable, Equatable {
    /// A real value was replaced by its placeholder.
    case masked(secret: String, site: MaskSite, form: PlaceholderForm)
    /// The response to the pending upgrade (or CONNECT) request decided it.
    case upgrade(UpgradeDecision.Outcome)
    case framingError(ResponseFramingError, detail: String)
}

public struct MaskOutput {
    /// Bytes for the guest, in order; unchanged input travels as slices of the input.
    public var guest: [ByteBuffer] = []
    public var events: [MaskEvent] = []
    /// Bytes the value scan looked at (for `keyhole_response_bytes_scanned_total`).
    public var scannedBytes = 0

    public init() {}

    /// Gives back the capacity of the arrays the caller has drained (a quiet connection).
    public mutating func releaseDrainedCapacity() {
        if guest.isEmpty { guest = [] }
        if events.isEmpty { events = [] }
    }
}

/// The upstream → guest half of a connection (HTTP/1.1): reads each response's framing,
/// paired with the requests the guest sent, and replaces every real value it finds by its
/// placeholder (response masking, BRIEF §4).
///
/// - Heads are held whole (64 KiB at most) and masked exactly: the placeholder replaces
///   the value.
/// - Bodies stream. The replacement keeps the length: the placeholder, padded with `*` to
///   the value's length (or cut to it), so `Content-Length` and chunk sizes stay true, no
///   body is held, and a value split across reads or chunks is still found. base64 keeps
///   its length too (the decoded value reads as the padded placeholder).
/// - After a `101` for `websocket`, server frames are parsed and their payloads masked the
///   same way; after any other switch or a CONNECT, the stream is masked as it is.
/// - While masking is on the request side asks for `identity`. A `gzip` or `deflate` body
///   sent anyway is decoded, masked and sent identity-encoded (chunked; `Content-Encoding`
///   and `Content-Length` dropped). Any other coding (`br`, `zstd`, stacked codings, or
///   gzip to an HTTP/1.0 client) is never forwarded: the connection is reset
///   (`value-in-response`).
///
/// Pure: bytes in, bytes and events out, independent of how the input was split.
public final class ResponseMasker {
    enum State {
        case head
        case body(remaining: Int)
        case closeDelimited
        case chunkSize
        case chunkData(remaining: Int)
        case chunkDataEnd(seen: Int)
        case trailers
        case websocketHeader
        case websocketPayload(remaining: Int)
        case relay
        case failed
    }

    public static let maxHead = 64 * 1024

    let secrets: [CompiledSecret]
    let matcher: ValueMatcher
    // One connection's state, touched from one event loop: no dynamic exclusivity checks
    // (a measurable share of a small response's cost).
    /// Whether values are looked for (a value may have gone upstream on this connection).
    @exclusivity(unchecked) public private(set) var masking: Bool
    @exclusivity(unchecked) var state = State.head
    @exclusivity(unchecked) var expected: [ExpectedResponse] = []
    @exclusivity(unchecked) var expectedFront = 0
    @exclusivity(unchecked) var headBytes: [UInt8] = []
    @exclusivity(unchecked) var line: [UInt8] = []
    @exclusivity(unchecked) var trailerLine: [UInt8] = []
    @exclusivity(unchecked) var frameHeader: [UInt8] = []
    @exclusivity(unchecked) var stream: MaskingStream
    @exclusivity(unchecked) var site = MaskSite.body
    /// The body's content coding being decoded (gzip or deflate), if any.
    @exclusivity(unchecked) var decoder: BodyDecoder?

    /// `secrets`: the policy's, compiled once and shared by its connections.
    public init(secrets: SecretSet, masking: Bool) {
        self.secrets = secrets.secrets
        self.matcher = secrets.values
        self.masking = masking && !matcher.isEmpty
        self.stream = MaskingStream(matcher: matcher)
    }

    /// The same, compiling `secrets` for this masker alone (tools and tests).
    public convenience init(secrets: [Secret], masking: Bool) {
        self.init(secrets: SecretSet(secrets), masking: masking)
    }

    /// From now on values are looked for (a substitution happened on this connection).
    public func activate() {
        if !masking && !matcher.isEmpty { masking = true }
    }

    /// A request went upstream; its response comes after those of earlier requests.
    public func expect(_ request: ExpectedResponse) {
        expected.append(request)
        // The upstream was told to close after it (or is HTTP/1.0): not a connection to reuse.
        if request.upstreamCloses || request.http10 { upstreamReusable = false }
    }

    /// Requests sent upstream whose responses have not (all) come back.
    public var outstandingResponses: Int { expected.count - expectedFront }

    /// The upstream connection can carry another guest's requests once this one is done:
    /// every response so far was framed by length or chunks, none said `Connection: close`
    /// or came from HTTP/1.0, none switched protocols or came unasked, nothing broke.
    public private(set) var upstreamReusable = true

    /// The response to a request marked `closeAfter` is complete: the guest's connection
    /// is to be closed now (what followed it is not for the guest).
    public private(set) var guestCloseDue = false

    /// A quiet connection between responses, every request answered, gives back the
    /// capacity its per-response scratch kept; the next response allocates it again.
    /// Connection state (masking on, framing expectations) stays.
    public func releaseIdleCapacity() {
        guard betweenResponses, expectedFront == expected.count else { return }
        expected = []
        expectedFront = 0
        headBytes = []
        line = []
        trailerLine = []
        frameHeader = []
        stream.releaseIdleCapacity()
    }

    /// Between responses: nothing of one has arrived and nothing is held.
    public var betweenResponses: Bool {
        guard case .head = state else { return false }
        return headBytes.isEmpty && stream.scanned == stream.emitted
    }

    /// The request the next final response answers (a GET when the upstream answers more
    /// than was asked).
    var front: ExpectedResponse { expectedFront < expected.count ? expected[expectedFront] : ExpectedResponse() }

    private func popFront() {
        if expectedFront < expected.count {
            if expected[expectedFront].closeAfter { guestCloseDue = true }
            expectedFront += 1
        }
        if expectedFront > 64, expectedFront * 2 > expected.count {
            expected.removeFirst(expectedFront)
            expectedFront = 0
        }
    }

    public func consume(_ buffer: ByteBuffer, into output: inout MaskOutput) {
        var input = buffer
        while input.readableBytes > 0 {
            if guestCloseDue {
                // The guest's last response is out: what follows is for nobody.
                upstreamReusable = false
                break
            }
            switch state {
            case .failed:
                return
            case .head:
                consumeHead(&input, &output)
            case .body(let remaining):
                let n = min(remaining, input.readableBytes)
                content(input.readSlice(length: n)!, &output)
                if case .failed = state { return }
                if n == remaining {
                    endBody(&output)
                } else {
                    state = .body(remaining: remaining - n)
                }
            case .closeDelimited:
                content(input.readSlice(length: input.readableBytes)!, &output)
            case .relay:
                scan(input.readSlice(length: input.readableBytes)!, &output)
            case .chunkSize:
                consumeChunkSize(&input, &output)
            case .chunkData(let remaining):
                let n = min(remaining, input.readableBytes)
                content(input.readSlice(length: n)!, &output)
                if case .failed = state { return }
                state = n == remaining ? .chunkDataEnd(seen: 0) : .chunkData(remaining: remaining - n)
            case .chunkDataEnd(let seen):
                let byte = input.getInteger(at: input.readerIndex, as: UInt8.self)!
                guard byte == (seen == 0 ? 0x0D : 0x0A) else { return fail(.malformedChunk, "no CRLF after chunk data", &output) }
                framing(input.readSlice(length: 1)!, &output)
                state = seen == 0 ? .chunkDataEnd(seen: 1) : .chunkSize
            case .trailers:
                consumeTrailers(&input, &output)
            case .websocketHeader:
                consumeFrameHeader(&input, &output)
                continue
            case .websocketPayload(let remaining):
                let n = min(remaining, input.readableBytes)
                scan(input.readSlice(length: n)!, &output)
                state = n == remaining ? .websocketHeader : .websocketPayload(remaining: remaining - n)
            }
        }
        if masking { stream.drain(final: false, site: site, secrets: secrets, into: &output) }
    }

    /// The upstream closed: a close-delimited body ends here; anything held is decided.
    public func finish(into output: inout MaskOutput) {
        if case .failed = state { return }
        if case .closeDelimited = state, decoder != nil { endDecoding(&output) }
        if case .failed = state { return }
        stream.drain(final: true, site: site, secrets: secrets, into: &output)
    }

    // MARK: pieces

    private func scan(_ bytes: ByteBuffer, _ output: inout MaskOutput) {
        guard masking else { return output.guest.append(bytes) }
        output.scannedBytes += bytes.readableBytes
        stream.scan(bytes)
    }

    private func pass(_ bytes: ByteBuffer, _ output: inout MaskOutput) {
        guard masking else { return output.guest.append(bytes) }
        stream.drain(final: false, site: site, secrets: secrets, into: &output)
        if stream.mayCarryValue(through: bytes) {
            return fail(.valueInResponse, "a value may run through the response's framing (chunk or frame headers)", &output)
        }
        stream.pass(bytes)
    }

    /// A body's content: decoded first when it is compressed, then scanned.
    private func content(_ bytes: ByteBuffer, _ output: inout MaskOutput) {
        guard decoder != nil else { return scan(bytes, &output) }
        do {
            let decoded = try decoder!.decode(bytes)
            for piece in decoded where piece.readableBytes > 0 { emitChunk(piece, &output) }
        } catch {
            fail(.undecodableBody, "\(error)", &output)
        }
    }

    /// The original body's framing: forwarded, unless the body is decoded (then Keyhole
    /// frames what it sends itself).
    private func framing(_ bytes: ByteBuffer, _ output: inout MaskOutput) {
        if decoder == nil { pass(bytes, &output) }
    }

    private func emitChunk(_ piece: ByteBuffer, _ output: inout MaskOutput) {
        pass(ByteBuffer(string: String(piece.readableBytes, radix: 16) + "\r\n"), &output)
        scan(piece, &output)
        pass(ByteBuffer(string: "\r\n"), &output)
    }

    private func endDecoding(_ output: inout MaskOutput) {
        do {
            for piece in try decoder!.finish() where piece.readableBytes > 0 { emitChunk(piece, &output) }
        } catch {
            return fail(.undecodableBody, "\(error)", &output)
        }
        decoder = nil
        pass(ByteBuffer(string: "0\r\n\r\n"), &output)
    }

    private func fail(_ error: ResponseFramingError, _ detail: String, _ output: inout MaskOutput) {
        // What the scan decided before the fault goes out (however the input was split);
        // anything undecided (it may begin a value) does not.
        if masking { stream.drain(final: false, site: site, secrets: secrets, into: &output) }
        output.events.append(.framingError(error, detail: detail))
        state = .failed
        upstreamReusable = false
    }

    private func endBody(_ output: inout MaskOutput) {
        if decoder != nil {
            endDecoding(&output)
            if case .failed = state { return }
        }
        if masking { stream.drain(final: true, site: site, secrets: secrets, into: &output) }
        popFront()
        state = .head
    }

    // MARK: head

    private func consumeHead(_ input: inout ByteBuffer, _ output: inout MaskOutput) {
        // Empty lines before a status line are skipped (passed on), as RFC 9112 §2.2 allows.
        if headBytes.isEmpty {
            let view = input.readableBytesView
            let blank = view.prefix { $0 == 0x0D || $0 == 0x0A }.count
            if blank > 0 {
                output.guest.append(input.readSlice(length: blank)!)
                return
            }
        }
        // Up to the end of the head: an empty line (CRLF CRLF, or bare LFs).
        var end: Int?
        input.withUnsafeReadableBytes { b in
            var i = 0
            while i < b.count {
                if b[i] == 0x0A {
                    // The line before this LF was empty when the previous byte (here or held)
                    // is LF, or CR after an LF.
                    let prev1: UInt8? = i >= 1 ? b[i - 1] : headBytes.last
                    let prev2: UInt8? = i >= 2 ? b[i - 2] : (i == 1 ? headBytes.last : headBytes.dropLast().last)
                    if prev1 == 0x0A || (prev1 == 0x0D && prev2 == 0x0A) {
                        end = i + 1
                        return
                    }
                }
                i += 1
            }
        }
        let take = end ?? input.readableBytes
        if headBytes.count + take > Self.maxHead {
            return fail(.headTooLarge, "\(headBytes.count + take) bytes and no end", &output)
        }
        let piece = input.readSlice(length: take)!
        guard end != nil else {
            headBytes += piece.readableBytesView
            return
        }
        // The head as it came (a slice of the upstream's bytes: not copied unless it must
        // change, or arrived in pieces).
        let original: ByteBuffer
        if headBytes.isEmpty {
            original = piece
        } else {
            headBytes += piece.readableBytesView
            original = ByteBuffer(bytes: headBytes)
            headBytes = []
        }
        guard let parsed = original.withUnsafeReadableBytes({ ResponseHead($0) }) else {
            return fail(.malformedHead, String(decoding: original.readableBytesView.prefix(40), as: UTF8.self).debugDescription, &output)
        }
        // The final response to a request whose `Connection: close` Keyhole kept from the
        // upstream tells the guest that the connection closes.
        let final = parsed.status >= 200 || parsed.status == 101
        let sayClose = final && front.closeAfter && !parsed.close
        decideFraming(parsed, &output)
        if case .failed = state { return }
        if decoder != nil || sayClose {
            let head = Array(original.readableBytesView)
            var rewritten = decoder != nil ? ResponseHead.identityChunked(head) : head
            if sayClose { rewritten = ResponseHead.saying(close: rewritten) }
            emitHead(ByteBuffer(bytes: rewritten), &output)
        } else {
            emitHead(original, &output)
        }
    }

    /// The head, masked exactly (placeholders replace values).
    private func emitHead(_ head: ByteBuffer, _ output: inout MaskOutput) {
        guard masking else { return output.guest.append(head) }
        output.scannedBytes += head.readableBytes
        if let masked = head.withUnsafeReadableBytes({ maskExact($0, site: .head, &output) }) {
            output.guest.append(ByteBuffer(bytes: masked))
        } else {
            output.guest.append(head)
        }
    }

    private func maskExact(_ bytes: [UInt8], site: MaskSite, _ output: inout MaskOutput) -> [UInt8]? {
        bytes.withUnsafeBytes { maskExact($0, site: site, &output) }
    }

    /// `bytes` with every value replaced by its placeholder (base64 re-encoded in place), or
    /// nil when there is none.
    private func maskExact(_ b: UnsafeRawBufferPointer, site: MaskSite, _ output: inout MaskOutput) -> [UInt8]? {
        var result: [UInt8] = []
        var copied = 0
        var i = 0
        while let c = matcher.nextPlausibleCandidate(in: b, from: i, previous: nil) {
            guard case .match(let secret, let form, let length) = matcher.match(b, at: c, previous: nil, final: true) else {
                i = c + 1
                continue
            }
            result += b[copied..<c]
            if form == .base64 {
                result += matcher.maskBase64(Array(b[c..<(c + length)]), secret: secret, filler: secrets[secret].placeholder)
            } else {
                result += secrets[secret].placeholder
            }
            output.events.append(.masked(secret: secrets[secret].env, site: site, form: form))
            copied = c + length
            i = c + length
        }
        guard copied > 0 else { return nil }
        return result + b[copied...]
    }

    private func decideFraming(_ head: ResponseHead, _ output: inout MaskOutput) {
        let request = front
        let status = head.status
        if status >= 100 && status < 200 && status != 101 { return }  // interim: the final response follows
        // (An HTTP/1.0 request already made the connection unreusable in `expect`.)
        if head.close || outstandingResponses == 0 { upstreamReusable = false }
        if request.asksToSwitch {
            if status == 101, !request.isConnect {
                guard let chosen = head.upgrade.first(where: { request.upgrade.contains($0) }) else {
                    return fail(.unrequestedSwitch, "101 with Upgrade: \(head.upgrade.joined(separator: ","))", &output)
                }
                output.events.append(.upgrade(.accepted(protocol: chosen)))
                upstreamReusable = false
                popFront()
                site = chosen == "websocket" ? .websocket : .upgraded
                state = chosen == "websocket" ? .websocketHeader : .relay
                return
            }
            if request.isConnect, (200..<300).contains(status) {
                output.events.append(.upgrade(.accepted(protocol: nil)))
                upstreamReusable = false
                popFront()
                site = .upgraded
                state = .relay
                return
            }
            output.events.append(.upgrade(.declined))
        } else if status == 101 {
            return fail(.unrequestedSwitch, "101 to a request that asked for no upgrade", &output)
        }
        site = .body
        if request.isHead || status == 204 || status == 304 {
            popFront()
            state = .head
            return
        }
        if masking, let coding = head.contentCoding {
            // gzip or deflate, alone, to a client that takes chunked: decoded and masked.
            // (An empty body needs no decoding.)
            if head.transferEncoding || head.contentLength != 0 {
                guard !request.http10, let decoder = BodyDecoder(coding: coding) else {
                    return fail(.valueInResponse, "Content-Encoding: \(coding)", &output)
                }
                self.decoder = decoder
            }
        }
        if head.transferEncoding {
            state = head.chunked ? .chunkSize : .closeDelimited
            if !head.chunked { upstreamReusable = false }
        } else if let length = head.contentLength {
            guard length >= 0 else { return fail(.conflictingLength, "Content-Length", &output) }
            if length == 0 {
                popFront()
                state = .head
            } else {
                state = .body(remaining: length)
            }
        } else {
            state = .closeDelimited
            upstreamReusable = false
        }
    }

    // MARK: chunked

    /// Reads up to and including the next LF into `into`; true when the LF was reached.
    private func takeLine(_ input: inout ByteBuffer, into line: inout [UInt8]) -> ByteBuffer {
        let view = input.readableBytesView
        let n = view.firstIndex(of: 0x0A).map { $0 - view.startIndex + 1 } ?? view.count
        let slice = input.readSlice(length: n)!
        line += slice.readableBytesView
        return slice
    }

    private func consumeChunkSize(_ input: inout ByteBuffer, _ output: inout MaskOutput) {
        // The line is held until complete (1 KiB at most). A chunk extension is masked on
        // its own, exactly, like a head: it is framing, and the chunks' data stays one stream.
        _ = takeLine(&input, into: &line)
        guard line.count <= 1024 else { return fail(.malformedChunk, "chunk-size line too long", &output) }
        guard line.last == 0x0A else { return }
        var size = 0
        var digits = 0
        for c in line {
            guard let h = PlaceholderMatcher.hexValue(c) else { break }
            guard size < (1 << 55) else { return fail(.malformedChunk, "chunk size too large", &output) }
            size = size << 4 | Int(h)
            digits += 1
        }
        guard digits > 0 else { return fail(.malformedChunk, "no chunk size", &output) }
        if decoder == nil {
            // Decide the content before the line first, so events come in stream order
            // however the input was split.
            if masking { stream.drain(final: false, site: site, secrets: secrets, into: &output) }
            if masking, let masked = maskExact(line, site: .body, &output) {
                pass(ByteBuffer(bytes: masked), &output)
            } else {
                pass(ByteBuffer(bytes: line), &output)
            }
        }
        line.removeAll(keepingCapacity: true)
        if size == 0 {
            trailerLine.removeAll(keepingCapacity: true)
            state = .trailers
        } else {
            state = .chunkData(remaining: size)
        }
    }

    private func consumeTrailers(_ input: inout ByteBuffer, _ output: inout MaskOutput) {
        // Trailer lines are scanned like the body (dropped with a decoded body, whose
        // chunked framing is Keyhole's own); the empty line ends the response.
        let piece = takeLine(&input, into: &trailerLine)
        if decoder == nil { scan(piece, &output) }
        guard trailerLine.count <= Self.maxHead else { return fail(.malformedChunk, "trailer line too long", &output) }
        guard trailerLine.last == 0x0A else { return }
        let empty = trailerLine == [0x0D, 0x0A] || trailerLine == [0x0A]
        trailerLine.removeAll(keepingCapacity: true)
        if empty { endBody(&output) }
    }

    // MARK: WebSocket (server frames are not masked)

    private func consumeFrameHeader(_ input: inout ByteBuffer, _ output: inout MaskOutput) {
        guard let h = WebSocketStream.takeHeader(&input, into: &frameHeader) else { return }
        guard h[1] & 0x80 == 0 else { return fail(.websocketProtocol, "a masked server frame", &output) }
        guard let (length, _) = WebSocketStream.payloadLength(h) else { return fail(.websocketProtocol, "a frame length over 2^63", &output) }
        pass(ByteBuffer(bytes: h), &output)
        state = length == 0 ? .websocketHeader : .websocketPayload(remaining: length)
    }
}

/// A parsed response head (what framing needs). Parsed on the bytes: names compared by
/// length and case-folded bytes; only the rare headers (codings, `Upgrade`) become strings.
struct ResponseHead {
    var status = 0
    var contentLength: Int?
    var transferEncoding = false
    var chunked = false
    var contentCoding: String?
    var upgrade: [String] = []
    /// `Connection: close`, or an HTTP/1.0 status line: the upstream ends the connection.
    var close = false

    init?(_ bytes: UnsafeRawBufferPointer) {
        guard parse(bytes) else { return nil }
    }

    private mutating func parse(_ b: UnsafeRawBufferPointer) -> Bool {
        let count = b.count
        // Status line: "HTTP/1.x NNN[ reason]"
        var end = 0
        while end < count, b[end] != 0x0A { end += 1 }
        var lineEnd = end > 0 && b[end - 1] == 0x0D ? end - 1 : end
        guard lineEnd >= 12, b[0] == 0x48, b[1] == 0x54, b[2] == 0x54, b[3] == 0x50, b[4] == 0x2F, b[5] == 0x31, b[6] == 0x2E,
            b[8] == 0x20, (lineEnd == 12 || b[12] == 0x20)
        else { return false }
        var code = 0
        for k in 9...11 {
            guard b[k] >= 0x30, b[k] <= 0x39 else { return false }
            code = code * 10 + Int(b[k] - 0x30)
        }
        status = code
        if b[7] == 0x30 { close = true }  // HTTP/1.0: no keep-alive Keyhole relies on
        var length: Int?
        var conflicting = false
        var start = end + 1
        while start < count {
            end = start
            while end < count, b[end] != 0x0A { end += 1 }
            lineEnd = end > start && b[end - 1] == 0x0D ? end - 1 : end
            defer { start = end + 1 }
            if lineEnd == start { break }  // the empty line
            var colon = start
            while colon < lineEnd, b[colon] != 0x3A { colon += 1 }
            guard colon < lineEnd, colon > start else { return false }
            for k in start..<colon where b[k] == 0x20 || b[k] == 0x09 { return false }
            var valueStart = colon + 1
            var valueEnd = lineEnd
            while valueStart < valueEnd, b[valueStart] == 0x20 || b[valueStart] == 0x09 { valueStart += 1 }
            while valueEnd > valueStart, b[valueEnd - 1] == 0x20 || b[valueEnd - 1] == 0x09 { valueEnd -= 1 }
            let name = start..<colon
            func named(_ text: StaticString) -> Bool {
                guard name.count == text.utf8CodeUnitCount else { return false }
                return RequestHead.equalsIgnoringCase(b, name, text)
            }
            func value() -> String { String(decoding: UnsafeRawBufferPointer(rebasing: b[valueStart..<valueEnd]), as: UTF8.self) }
            switch name.count {
            case 14 where named("content-length"):
                // Digits, or a list of equal digits: read as a request's is.
                do {
                    let value = try RequestHead.parseContentLength(b, valueStart..<valueEnd)
                    if let existing = length, existing != value { conflicting = true }
                    length = value
                } catch .conflictingContentLength {
                    conflicting = true
                } catch {
                    return false
                }
            case 17 where named("transfer-encoding"):
                transferEncoding = true
                let codings = value().lowercased().split(separator: ",").map { $0.trimmingSpaces() }
                chunked = codings.last == "chunked"
                let other = codings.filter { $0 != "chunked" && $0 != "identity" }
                if !other.isEmpty { contentCoding = other.joined(separator: ", ") }
            case 16 where named("content-encoding"):
                if valueEnd - valueStart == 8, RequestHead.equalsIgnoringCase(b, valueStart..<valueEnd, "identity") { break }
                let codings = value().lowercased().split(separator: ",").map { $0.trimmingSpaces() }.filter { $0 != "identity" && !$0.isEmpty }
                if !codings.isEmpty { contentCoding = codings.joined(separator: ", ") }
            case 10 where named("connection"):
                if RequestHead.hasToken(b, valueStart..<valueEnd, "close") { close = true }
            case 7 where named("upgrade"):
                upgrade += value().split(separator: ",").map { UpgradeDecision.token($0) }
            default:
                break
            }
        }
        contentLength = conflicting ? -1 : length
        return true
    }
}

extension ResponseHead {
    /// The head without its `Content-Encoding`, `Content-Length` and `Transfer-Encoding`
    /// lines, and with `Transfer-Encoding: chunked`: for a body Keyhole decoded.
    static func identityChunked(_ head: [UInt8]) -> [UInt8] {
        var lines = head.split(separator: 0x0A, omittingEmptySubsequences: false).map { Array($0) + [0x0A] }
        lines.removeLast()  // after the final LF
        let end = lines.removeLast()  // the empty line
        let dropped: Set<String> = ["content-encoding", "content-length", "transfer-encoding"]
        var result = lines.removeFirst()
        for line in lines {
            let name = line.firstIndex(of: 0x3A).map { String(decoding: line[..<$0], as: UTF8.self).lowercased() } ?? ""
            if !dropped.contains(name) { result += line }
        }
        return result + Array("Transfer-Encoding: chunked\r\n".utf8) + end
    }

    /// The head with `Connection: close` added before its empty line.
    static func saying(close head: [UInt8]) -> [UInt8] {
        let end = head.count >= 2 && head[head.count - 2] == 0x0D ? head.count - 2 : head.count - 1
        return head[..<end] + Array("Connection: close\r\n".utf8) + head[end...]
    }
}

extension StringProtocol {
    /// Without leading and trailing spaces and tabs (HTTP's optional whitespace).
    func trimmingSpaces() -> String {
        String(String(self.drop { $0 == " " || $0 == "\t" }.reversed().drop { $0 == " " || $0 == "\t" }.reversed()))
    }
}
