import NIOCore

/// The guest's side of a WebSocket connection (RFC 6455), parsed frame by frame after a
/// `101` for `websocket`: client frames are masked, so placeholders are only visible once
/// unmasked.
///
/// A data message (its frames up to FIN, with any control frames between them) is held
/// until it is complete, up to `maxHeldMessage`; then its unmasked payload is scanned as
/// one: a placeholder in a text message, inside one frame, to a host whose identity holds,
/// with `inject.body`, is substituted (the frame is rebuilt with its new length and masked
/// again with its own key); anywhere else it is a violation (split across frames, in a
/// binary message, in a control frame, or not allowed there). A larger message is streamed
/// as it comes and only scanned: any placeholder in it is a violation. Frames with no
/// placeholder go on as the guest's own bytes.
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
    }

    /// The largest data message held for substitution.
    static let maxHeldMessage = 1 << 20

    var header: [UInt8] = []
    var frame: Frame?
    var remaining = 0
    /// The data message being assembled (text 1 or binary 2); nil between messages.
    var messageOpcode: UInt8?
    var held: [Frame] = []
    var heldBytes = 0
    /// The current message is too large to hold: streamed, and scanned by `streamScanner`.
    var streaming: StreamScanner?

    /// How many header bytes a frame starting with `header` has (once two are known).
    static func headerLength(_ header: [UInt8]) -> Int {
        let length7 = header[1] & 0x7F
        return 2 + (length7 == 126 ? 2 : length7 == 127 ? 8 : 0) + (header[1] & 0x80 != 0 ? 4 : 0)
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
                // A message too large to hold: forward as it comes, scan the plain bytes.
                output.forward(piece)
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
        while webSocket.header.count < 2 || webSocket.header.count < WebSocketStream.headerLength(webSocket.header) {
            guard let byte = input.readInteger(as: UInt8.self) else { return }
            webSocket.header.append(byte)
        }
        let h = webSocket.header
        webSocket.header = []
        let fin = h[0] & 0x80 != 0
        let opcode = h[0] & 0x0F
        var length = Int(h[1] & 0x7F)
        var k = 2
        if length == 126 {
            length = Int(h[2]) << 8 | Int(h[3])
            k = 4
        } else if length == 127 {
            guard h[2] & 0x80 == 0 else { return fail(.websocketProtocol, &output) }
            length = 0
            for i in 2..<10 { length = length << 8 | Int(h[i]) }
            k = 10
        }
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
        webSocket.frame = frame
        webSocket.remaining = length
        if !control, webSocket.streaming != nil { output.insert(frame.header) }
        if length == 0 { completeFrame(&output) }
    }

    private mutating func completeFrame(_ output: inout RewriteOutput) {
        guard let frame = webSocket.frame else { return }
        webSocket.frame = nil
        if frame.isControl {
            // Never substituted; a placeholder in a ping, pong or close is a violation.
            if let violation = firstPlaceholder(in: frame.plain, reason: .neverSubstituted) { return block(violation, &output) }
            if webSocket.messageOpcode == nil || webSocket.streaming != nil {
                emit(frame, &output)
            } else {
                webSocket.held.append(frame)  // keeps its place among the message's frames
            }
            return
        }
        if webSocket.streaming != nil {
            if frame.fin {
                scanStreamingMessage(final: true, &output)
                webSocket.streaming = nil
                webSocket.messageOpcode = nil
            }
            return
        }
        webSocket.held.append(frame)
        webSocket.heldBytes += frame.length
        if webSocket.heldBytes > WebSocketStream.maxHeldMessage {
            startStreaming(&output)
            if frame.fin {
                scanStreamingMessage(final: true, &output)
                webSocket.streaming = nil
                webSocket.messageOpcode = nil
            }
            return
        }
        if frame.fin { completeMessage(&output) }
    }

    /// The held message is complete: find its placeholders, substitute or refuse, emit.
    private mutating func completeMessage(_ output: inout RewriteOutput) {
        let frames = webSocket.held
        let text = webSocket.messageOpcode == 1
        webSocket.held = []
        webSocket.heldBytes = 0
        webSocket.messageOpcode = nil
        // The message's payload as one, with where each data frame's part starts.
        var message: [UInt8] = []
        var starts: [Int] = []
        for frame in frames where !frame.isControl {
            starts.append(message.count)
            message += frame.plain
        }
        let dataFrames = frames.indices.filter { !frames[$0].isControl }
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
                let first = starts.lastIndex { $0 <= c }!
                let last = starts.lastIndex { $0 <= c + length - 1 }!
                guard first == last else {
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
                case .success(let value):
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

    /// A message outgrew the hold: what was held goes on now, and the rest is streamed,
    /// scanned only.
    private mutating func startStreaming(_ output: inout RewriteOutput) {
        var scanner = StreamScanner(matcher: matcher)
        for frame in webSocket.held {
            if !frame.isControl { scanner.append(ByteBuffer(bytes: frame.plain)) }
        }
        webSocket.streaming = scanner
        let frames = webSocket.held
        webSocket.held = []
        webSocket.heldBytes = 0
        scanStreamingMessage(final: false, &output)
        if case .blocked = state { return }
        for frame in frames { emit(frame, &output) }
    }

    private mutating func scanStreamingMessage(final: Bool, _ output: inout RewriteOutput) {
        var found: [StreamItem] = []
        webSocket.streaming!.drain(final: final, into: &found)
        for item in found {
            if case .match(let secret, let form, _) = item {
                return block(makeViolation(secret: secret, site: .websocket, form: form, reason: .binaryOrLargeMessage), &output)
            }
        }
    }

    mutating func finishWebSocket(_ output: inout RewriteOutput) {
        // The guest closed mid-message: what it sent still may not carry a placeholder.
        if webSocket.streaming != nil {
            scanStreamingMessage(final: true, &output)
            return
        }
        var partial = webSocket.held
        if let frame = webSocket.frame { partial.append(frame) }
        for frame in partial {
            if let violation = firstPlaceholder(in: frame.plain, reason: .neverSubstituted) { return block(violation, &output) }
        }
        for frame in webSocket.held { emit(frame, &output) }
        if let frame = webSocket.frame {
            output.insert(frame.header)
            for piece in frame.payload { output.forward(piece) }
        }
        webSocket.held = []
        webSocket.frame = nil
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
