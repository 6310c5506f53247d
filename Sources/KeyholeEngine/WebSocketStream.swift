import NIOCore

/// The guest's side of a WebSocket connection (RFC 6455), parsed frame by frame after a
/// `101` for `websocket`: client frames are masked, so placeholders are only visible once
/// unmasked.
///
/// A data message (its frames up to FIN, with any control frames between them) is held
/// until it is complete, within bounds: `maxHeldMessage` bytes (headers and control frames
/// count), `maxHeldFrames` frames, and what the process's `HeldBodyBudget` can give. Then
/// its unmasked payload is scanned as one: a placeholder in a text message, inside one
/// frame, to a host whose identity holds, with `inject.body`, is substituted (the frame is
/// rebuilt with its new length and masked again with its own key); anywhere else it is a
/// violation (split across frames, in a binary message, in a control frame, or not allowed
/// there).
///
/// A message that does not fit the bounds — known from a frame's header, before its payload
/// arrives — is streamed and only scanned: any placeholder in it is a violation. Its bytes
/// go on as soon as the scanner has decided the plain bytes before them, so no part of a
/// placeholder is forwarded ahead of the decision. Frames with no placeholder go on as the
/// guest's own bytes.
struct WebSocketStream {
    struct Frame {
        var fin: Bool
        var opcode: UInt8
        var key: [UInt8]
        var length: Int
        /// The frame's header as the guest sent it.
        var header: ByteBuffer
        /// Its payload as sent (masked), and unmasked.
        var payload: [ByteBuffer] = []
        var plain: [UInt8] = []

        var isControl: Bool { opcode >= 8 }
        /// What holding it costs: its header and its payload, twice (masked and plain).
        var cost: Int { header.readableBytes + 2 * length }
    }

    /// What a held message may cost (headers, payloads as sent and unmasked, control frames).
    static let maxHeldMessage = 2 << 20
    /// The most frames a held message may have (empty continuations and pings included).
    static let maxHeldFrames = 1024

    var header: [UInt8] = []
    var frame: Frame?
    var remaining = 0
    /// The data message being assembled (text 1 or binary 2); nil between messages.
    var messageOpcode: UInt8?
    var held: [Frame] = []
    var heldCost = 0
    /// What this connection holds of the process's budget.
    var reserved = 0
    /// The current message does not fit the hold: streamed, and scanned by `streaming`.
    var streaming: StreamScanner<PlaceholderMatcher>?
    /// Streaming: the guest's bytes waiting for the scanner to decide the plain bytes before
    /// them. `at` is the plain position the bytes start at; `payload` bytes are released as
    /// far as the decision reaches, headers and control frames once it reaches `at`.
    var outbox = CircularBuffer<(at: Int, bytes: ByteBuffer, payload: Bool)>(initialCapacity: 1)
    /// Streaming: plain bytes given to the scanner.
    var streamed = 0

    /// How many header bytes a frame starting with `header` has (once two are known).
    static func headerLength(_ header: [UInt8]) -> Int {
        let length7 = header[1] & 0x7F
        return 2 + (length7 == 126 ? 2 : length7 == 127 ? 8 : 0) + (header[1] & 0x80 != 0 ? 4 : 0)
    }

    /// Moves header bytes from `input` into `header` (a frame header split anywhere); returns
    /// the whole header once it is complete, and starts `header` afresh.
    static func takeHeader(_ input: inout ByteBuffer, into header: inout [UInt8]) -> [UInt8]? {
        while header.count < 2 || header.count < headerLength(header) {
            guard let byte = input.readInteger(as: UInt8.self) else { return nil }
            header.append(byte)
        }
        defer { header = [] }
        return header
    }

    /// The payload length a whole header declares, and where its masking key (if any)
    /// starts; nil for a 64-bit length with the top bit set (RFC 6455 forbids it).
    static func payloadLength(_ h: [UInt8]) -> (length: Int, keyOffset: Int)? {
        switch h[1] & 0x7F {
        case 126:
            return (Int(h[2]) << 8 | Int(h[3]), 4)
        case 127:
            guard h[2] & 0x80 == 0 else { return nil }
            var length = 0
            for i in 2..<10 { length = length << 8 | Int(h[i]) }
            return (length, 10)
        case let length7:
            return (Int(length7), 2)
        }
    }
}

extension RewriterCore {
    mutating func consumeWebSocket(_ input: inout ByteBuffer, _ output: inout RewriteOutput) {
        while input.readableBytes > 0 {
            if case .blocked = state { return }
            guard webSocket.frame != nil else {
                readFrameHeader(&input, &output)
                continue
            }
            let n = min(webSocket.remaining, input.readableBytes)
            let piece = input.readSlice(length: n)!
            let key = webSocket.frame!.key
            let offset = webSocket.frame!.length - webSocket.remaining
            var plain = [UInt8](repeating: 0, count: n)
            piece.withUnsafeReadableBytes { bytes in
                for i in 0..<n { plain[i] = bytes[i] ^ key[(offset + i) & 3] }
            }
            webSocket.remaining -= n
            if !webSocket.frame!.isControl, webSocket.streaming != nil {
                // Streamed: released as the scanner decides the plain bytes.
                webSocket.outbox.append((webSocket.streamed, piece, true))
                webSocket.streamed += n
                webSocket.streaming!.append(ByteBuffer(bytes: plain))
                scanStreamingMessage(final: false, &output)
            } else {
                webSocket.frame!.payload.append(piece)
                webSocket.frame!.plain += plain
            }
            if webSocket.remaining == 0 { completeFrame(&output) }
        }
    }

    private mutating func readFrameHeader(_ input: inout ByteBuffer, _ output: inout RewriteOutput) {
        guard let h = WebSocketStream.takeHeader(&input, into: &webSocket.header) else { return }
        let fin = h[0] & 0x80 != 0
        let opcode = h[0] & 0x0F
        guard let (length, k) = WebSocketStream.payloadLength(h) else { return fail(.websocketProtocol, &output) }
        let masked = h[1] & 0x80 != 0
        let control = opcode >= 8
        // Client frames are masked; no extension was offered, so no reserved bit is set;
        // control frames are short and whole; continuations continue a message.
        guard masked, h[0] & 0x70 == 0, [0, 1, 2, 8, 9, 10].contains(opcode), !control || (fin && length <= 125),
            opcode != 0 || webSocket.messageOpcode != nil, control || opcode == 0 || webSocket.messageOpcode == nil
        else { return fail(.websocketProtocol, &output) }
        let frame = WebSocketStream.Frame(
            fin: fin, opcode: opcode, key: Array(h[k..<(k + 4)]), length: length, header: ByteBuffer(bytes: h))
        if opcode == 1 || opcode == 2 { webSocket.messageOpcode = opcode }
        // Within a message, decide from the header whether the frame can be held.
        if webSocket.messageOpcode != nil, webSocket.streaming == nil, !holdFits(frame) {
            startStreaming(&output)
            if case .blocked = state { return }
        }
        webSocket.frame = frame
        webSocket.remaining = length
        if !control, webSocket.streaming != nil { webSocket.outbox.append((webSocket.streamed, frame.header, false)) }
        if length == 0 { completeFrame(&output) }
    }

    /// Whether the held message can take `frame` too; if so, its cost is reserved.
    private mutating func holdFits(_ frame: WebSocketStream.Frame) -> Bool {
        let cost = frame.cost
        guard webSocket.held.count < WebSocketStream.maxHeldFrames, webSocket.heldCost + cost <= WebSocketStream.maxHeldMessage else {
            return false
        }
        if let heldBodyBudget {
            guard heldBodyBudget.reserve(cost) else { return false }
            webSocket.reserved += cost
        }
        webSocket.heldCost += cost
        return true
    }

    private mutating func completeFrame(_ output: inout RewriteOutput) {
        guard let frame = webSocket.frame else { return }
        webSocket.frame = nil
        if frame.isControl {
            // Never substituted; a placeholder in a ping, pong or close is a violation.
            if let violation = firstPlaceholder(in: frame.plain, reason: .neverSubstituted) { return block(violation, &output) }
            if webSocket.streaming != nil {
                // After the message's bytes so far, once they are decided.
                webSocket.outbox.append((webSocket.streamed, frame.header, false))
                for piece in frame.payload { webSocket.outbox.append((webSocket.streamed, piece, false)) }
                releaseStreamed(&output)
            } else if webSocket.messageOpcode == nil {
                emit(frame, &output)
            } else {
                webSocket.held.append(frame)  // keeps its place among the message's frames
            }
            return
        }
        if webSocket.streaming != nil {
            if frame.fin { endStreaming(&output) }
            return
        }
        webSocket.held.append(frame)
        if frame.fin { completeMessage(&output) }
    }

    /// The held message is complete: find its placeholders, substitute or refuse, emit.
    private mutating func completeMessage(_ output: inout RewriteOutput) {
        let frames = webSocket.held
        let text = webSocket.messageOpcode == 1
        webSocket.held = []
        webSocket.messageOpcode = nil
        releaseHold()
        // The message's payload as one, with where each data frame's part starts.
        var message: [UInt8] = []
        var starts: [Int] = []
        let dataFrames = frames.indices.filter { !frames[$0].isControl }
        for index in dataFrames {
            starts.append(message.count)
            message += frames[index].plain
        }
        // The data frame holding byte `position` of the message (starts ascend; empty
        // frames share a start, and the last of them holds the byte).
        func part(_ position: Int) -> Int {
            var low = 0
            var high = starts.count
            while low < high {
                let mid = (low + high) / 2
                if starts[mid] <= position { low = mid + 1 } else { high = mid }
            }
            return low - 1
        }
        var replacements: [Int: [(range: Range<Int>, value: ByteBuffer)]] = [:]
        var i = 0
        var failure: Violation?
        message.withUnsafeBytes { b in
            while failure == nil, let c = matcher.nextCandidate(in: b, from: i) {
                guard case .match(let secret, let form, let length) = matcher.match(b, at: c, previous: c > 0 ? b[c - 1] : nil, final: true)
                else {
                    i = c + 1
                    continue
                }
                i = c + length
                let first = part(c)
                guard first == part(c + length - 1) else {
                    failure = makeViolation(secret: secret, site: .websocket, form: form, reason: .splitAcrossFrames)
                    return
                }
                guard text else {
                    failure = makeViolation(secret: secret, site: .websocket, form: form, reason: .binaryOrLargeMessage)
                    return
                }
                switch decide(secret: secret, site: .websocket, form: form) {
                case .failure(let violation):
                    failure = violation
                case .success(let value), .passThrough(let value):
                    let local = (c - starts[first])..<(c - starts[first] + length)
                    replacements[dataFrames[first], default: []].append((local, value))
                }
            }
        }
        if let failure { return block(failure, &output) }
        for (index, frame) in frames.enumerated() {
            guard let edits = replacements[index] else {
                emit(frame, &output)
                continue
            }
            var plain: [UInt8] = []
            var position = 0
            for edit in edits {
                plain += frame.plain[position..<edit.range.lowerBound]
                plain += edit.value.readableBytesView
                position = edit.range.upperBound
            }
            plain += frame.plain[position...]
            output.insert(Self.maskedFrame(fin: frame.fin, opcode: frame.opcode, key: frame.key, plain: plain))
        }
        flushSubstitutionEvents(&output)
    }

    /// The message outgrew the hold: what was held is scanned and released as decided, and
    /// the rest is streamed, scanned only.
    private mutating func startStreaming(_ output: inout RewriteOutput) {
        var scanner = StreamScanner(matcher: matcher)
        webSocket.streamed = 0
        for frame in webSocket.held {
            webSocket.outbox.append((webSocket.streamed, frame.header, false))
            if frame.isControl {
                for piece in frame.payload { webSocket.outbox.append((webSocket.streamed, piece, false)) }
                continue
            }
            var at = webSocket.streamed
            for piece in frame.payload {
                webSocket.outbox.append((at, piece, true))
                at += piece.readableBytes
            }
            scanner.append(ByteBuffer(bytes: frame.plain))
            webSocket.streamed += frame.plain.count
        }
        webSocket.streaming = scanner
        webSocket.held = []
        releaseHold()
        scanStreamingMessage(final: false, &output)
    }

    /// The streamed message ended: decide the rest, release it, and go back to holding.
    private mutating func endStreaming(_ output: inout RewriteOutput) {
        scanStreamingMessage(final: true, &output)
        if case .blocked = state { return }
        webSocket.streaming = nil
        webSocket.messageOpcode = nil
    }

    private mutating func scanStreamingMessage(final: Bool, _ output: inout RewriteOutput) {
        var found: [StreamItem] = []
        webSocket.streaming!.drain(final: final, into: &found)
        for item in found {
            if case .match(let secret, let form, _) = item {
                webSocket.outbox.removeAll()
                return block(makeViolation(secret: secret, site: .websocket, form: form, reason: .binaryOrLargeMessage), &output)
            }
        }
        releaseStreamed(&output)
    }

    /// Forwards what the scanner has decided.
    private mutating func releaseStreamed(_ output: inout RewriteOutput) {
        let decided = webSocket.streaming!.position
        while let first = webSocket.outbox.first, first.at <= decided {
            guard first.payload else {
                output.insert(webSocket.outbox.removeFirst().bytes)
                continue
            }
            let clear = decided - first.at
            if clear >= first.bytes.readableBytes {
                output.forward(webSocket.outbox.removeFirst().bytes)
            } else {
                if clear > 0 {
                    var rest = webSocket.outbox.removeFirst()
                    output.forward(rest.bytes.readSlice(length: clear)!)
                    rest.at += clear
                    webSocket.outbox.prepend(rest)
                }
                return
            }
        }
    }

    /// Gives back what the held message took of the process's budget.
    private mutating func releaseHold() {
        webSocket.heldCost = 0
        releaseWebSocketReservation()
    }

    mutating func releaseWebSocketReservation() {
        guard webSocket.reserved > 0 else { return }
        heldBodyBudget?.release(webSocket.reserved)
        webSocket.reserved = 0
    }

    mutating func finishWebSocket(_ output: inout RewriteOutput) {
        // The guest closed mid-message: what it sent still may not carry a placeholder.
        if webSocket.streaming != nil {
            scanStreamingMessage(final: true, &output)
            return
        }
        var partial = webSocket.held
        if let frame = webSocket.frame { partial.append(frame) }
        defer {
            webSocket.held = []
            webSocket.frame = nil
            releaseHold()
        }
        // Each frame on its own (an unfinished message is never substituted), then the
        // message's data as one (a placeholder split across its frames).
        for frame in partial {
            if let violation = firstPlaceholder(in: frame.plain, reason: .neverSubstituted) { return block(violation, &output) }
        }
        var message: [UInt8] = []
        for frame in partial where !frame.isControl { message += frame.plain }
        if let violation = firstPlaceholder(in: message, reason: .splitAcrossFrames) { return block(violation, &output) }
        for frame in webSocket.held { emit(frame, &output) }
        if let frame = webSocket.frame {
            output.insert(frame.header)
            for piece in frame.payload { output.forward(piece) }
        }
    }

    private func emit(_ frame: WebSocketStream.Frame, _ output: inout RewriteOutput) {
        output.insert(frame.header)
        for piece in frame.payload { output.forward(piece) }
    }

    private mutating func firstPlaceholder(in plain: [UInt8], reason: ViolationReason) -> Violation? {
        var found: (Int, PlaceholderForm)?
        plain.withUnsafeBytes { b in
            var i = 0
            while let c = matcher.nextCandidate(in: b, from: i) {
                if case .match(let secret, let form, _) = matcher.match(b, at: c, previous: c > 0 ? b[c - 1] : nil, final: true) {
                    found = (secret, form)
                    return
                }
                i = c + 1
            }
        }
        guard let (secret, form) = found else { return nil }
        return makeViolation(secret: secret, site: .websocket, form: form, reason: reason)
    }

    /// A client frame: FIN/opcode, the mask bit and length, the key, the masked payload.
    static func maskedFrame(fin: Bool, opcode: UInt8, key: [UInt8], plain: [UInt8]) -> ByteBuffer {
        var frame = ByteBuffer()
        frame.writeInteger((fin ? 0x80 : 0) | opcode)
        if plain.count < 126 {
            frame.writeInteger(UInt8(0x80 | plain.count))
        } else if plain.count <= 0xFFFF {
            frame.writeInteger(UInt8(0x80 | 126))
            frame.writeInteger(UInt16(plain.count))
        } else {
            frame.writeInteger(UInt8(0x80 | 127))
            frame.writeInteger(UInt64(plain.count))
        }
        frame.writeBytes(key)
        frame.writeBytes(plain.enumerated().map { $0.element ^ key[$0.offset & 3] })
        return frame
    }
}
