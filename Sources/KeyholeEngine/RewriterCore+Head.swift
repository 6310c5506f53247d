import KeyholePolicy
import NIOCore

/// The request head: accumulating it (bounded, split anywhere), the Host rules, finding
/// placeholders in it, and emitting it with its edits as slices of the input.
extension RewriterCore {
    // MARK: - Head

    mutating func consumeHead(_ input: inout ByteBuffer, _ output: inout RewriteOutput) {
        if closed {
            input.moveReaderIndex(forwardBy: input.readableBytes)
            return
        }
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

    mutating func processHead(_ buffer: ByteBuffer, _ output: inout RewriteOutput) {
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
            if configuration.identityResponses { askForIdentity() }
            closeAfter = configuration.keepUpstreamAlive && keepUpstreamAlive()
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
        output.expectedResponses.append(expectedResponse())

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
                if let heldBodyBudget {
                    guard heldBodyBudget.reserve(length) else {
                        fail(.heldBodyBudgetExhausted, &output)
                        return
                    }
                    heldBodyReserved = length
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

    /// How the response to the request just parsed is framed.
    func expectedResponse() -> ExpectedResponse {
        var response = ExpectedResponse(isConnect: head.isConnect, http10: head.minorVersion == 0)
        response.closeAfter = closeAfter
        response.upstreamCloses = head.closeRequested && !closeAfter
        headBuffer.withUnsafeReadableBytes { b in
            response.isHead = head.method.count == 4 && b[head.method].elementsEqual("HEAD".utf8)
            if head.upgrade, let field = head.fields.first(where: { $0.kind == .upgrade }) {
                response.upgrade = String(decoding: UnsafeRawBufferPointer(rebasing: b[field.value]), as: UTF8.self)
                    .split(separator: ",").map { UpgradeDecision.token($0) }.filter { !$0.isEmpty }
            }
        }
        return response
    }

    mutating func finishRequest(_ output: inout RewriteOutput) {
        if case .blocked = state { return }
        // An upgrade request waits for its response (read by `ResponseMasker`, paired through
        // `expectedResponses`); what the guest sends meanwhile is held.
        state = (head.upgrade || head.isConnect) ? .awaitingUpgrade : .head
        if closeAfter { closed = true }
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
    mutating func dropWebSocketExtensions(_ b: UnsafeRawBufferPointer) {
        for field in head.fields where field.name.count == 24 && RequestHead.equalsIgnoringCase(b, field.name, "sec-websocket-extensions") {
            guard !edits.contains(where: { $0.range.overlaps(field.line) }) else { continue }
            edits.append((field.line, ByteBuffer()))
        }
    }

    /// Responses are masked on this connection: a content coding would hide values from the
    /// scan, so the request asks for none (its `Accept-Encoding` lines become one
    /// `Accept-Encoding: identity`).
    mutating func askForIdentity() {
        var replaced = false
        for field in head.fields where field.kind == .acceptEncoding {
            guard !edits.contains(where: { $0.range.overlaps(field.line) }) else { continue }
            edits.append((field.line, replaced ? ByteBuffer() : Self.identityLine))
            replaced = true
        }
        if !replaced {
            let end = head.length - 2  // before the empty line
            edits.append((end..<end, Self.identityLine))
        }
    }

    static let identityLine = ByteBuffer(string: "Accept-Encoding: identity\r\n")

    /// An HTTP/1.1 request that asks to close (`Connection: close`) goes upstream without
    /// its `Connection` lines, so the upstream connection stays open for the proxy's pool;
    /// the guest's own connection is closed after the response. Not for upgrades and
    /// CONNECT, whose `Connection` is part of the switch, nor where another edit touches a
    /// `Connection` line (then the upstream closes, as asked). Returns whether it applied.
    mutating func keepUpstreamAlive() -> Bool {
        guard head.closeRequested, head.minorVersion == 1, !head.upgrade, !head.isConnect else { return false }
        let lines = head.fields.filter { $0.kind == .connection }.map(\.line)
        guard !lines.contains(where: { line in edits.contains { $0.range.overlaps(line) } }) else { return false }
        for line in lines { edits.append((line, ByteBuffer())) }
        return true
    }

    /// Per secret, why it may not be substituted in this request (nil: it may). Returns
    /// whether the host rules hold (see `hostRulesHold`).
    mutating func computeRequestDenials(_ b: UnsafeRawBufferPointer) -> Bool {
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
    func hostRulesHold(_ b: UnsafeRawBufferPointer) -> Bool {
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

    mutating func bodyMaySubstitute() -> Bool {
        if head.contentEncoded { return false }
        for i in secrets.indices where secrets[i].inject.body && requestDenial[i] == nil { return true }
        return false
    }

    /// Finds placeholders in the head; records substitutions as edits. Returns the first
    /// violation, if any.
    mutating func rewriteHead(_ b: UnsafeRawBufferPointer) -> Violation? {
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
            case .success(let replacement), .passThrough(let replacement):
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
    mutating func rewriteBasicAuth(_ b: UnsafeRawBufferPointer, _ value: Range<Int>) -> Violation? {
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
                case .passThrough:
                    break  // the credentials stay as they are
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
        for (secret, site, passedThrough) in pendingSubstitutionEvents {
            let env = secrets[secret].env
            output.events.append(passedThrough ? .passedThrough(secret: env, site: site, request: request) : .substituted(secret: env, site: site, request: request))
        }
        pendingSubstitutionEvents.removeAll(keepingCapacity: true)
    }

    /// Emits the head with its edits applied: unchanged spans as slices.
    mutating func emitHead(_ output: inout RewriteOutput, contentLength: Int? = nil) {
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
}
