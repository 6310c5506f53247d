import KeyholePolicy
import NIOCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Bodies: streamed (scan only), held (`Content-Length`, substituted, length rewritten),
/// chunked (re-framed, streamed) and their trailers.
extension RewriterCore {
    // MARK: - Bodies

    /// Forwards decided bytes; any placeholder is a violation (nothing here substitutes).
    mutating func drainStreaming(final: Bool, site: Site, _ output: inout RewriteOutput) {
        items.removeAll(keepingCapacity: true)
        scanner.drain(final: final, into: &items)
        for item in items {
            switch item {
            case .data(let slice):
                output.forward(slice)
            case .match(let secret, let form, _):
                switch decide(secret: secret, site: site, form: form) {
                case .failure(let violation):
                    block(violation, &output)
                case .passThrough(let placeholder) where form == .raw:
                    // The same bytes (a streamed body keeps its length): on it goes.
                    output.insert(placeholder)
                    flushSubstitutionEvents(&output)
                    continue
                case .passThrough:
                    block(makeViolation(secret: secret, site: site, form: form, reason: .encodedForm), &output)
                case .success:
                    // Streaming is chosen only when no secret may be substituted in the body.
                    block(makeViolation(secret: secret, site: site, form: form, reason: .injectionDisabled), &output)
                }
                return
            }
        }
    }

    mutating func completeHeldBody(_ output: inout RewriteOutput) {
        releaseHeldBody()
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
                case .success(let replacement), .passThrough(let replacement):
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

    mutating func consumeChunkSizeLine(_ input: inout ByteBuffer, _ output: inout RewriteOutput) {
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
    mutating func reframe(final: Bool, _ output: inout RewriteOutput) {
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
                case .success(let replacement), .passThrough(let replacement):
                    segmentPieces.append((replacement, true))
                    segmentLength += replacement.readableBytes
                    itemPosition += length
                }
            }
        }
        while let end = segmentEnd(), end <= scanner.position { closeSegment(end, &output) }
    }

    mutating func segmentEnd() -> Int? {
        guard let chunkEnd = chunkEnds.first else { return nil }
        return min(segmentStart + configuration.chunkSegment, chunkEnd)
    }

    mutating func closeSegment(_ end: Int, _ output: inout RewriteOutput) {
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

    mutating func consumeTrailers(_ input: inout ByteBuffer, _ output: inout RewriteOutput) {
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

    /// Gives back what the held body took of the process's budget.
    mutating func releaseHeldBody() {
        guard heldBodyReserved > 0 else { return }
        heldBodyBudget?.release(heldBodyReserved)
        heldBodyReserved = 0
    }
}
