public import KeyholePolicy
public import NIOCore

/// One header field of an HTTP/2 header block (names lowercase, pseudo-headers first).
public struct H2Field: Sendable, Hashable {
    public var name: String
    public var value: String

    public init(_ name: String, _ value: String) {
        self.name = name
        self.value = value
    }
}

/// What goes on to one side of an HTTP/2 stream, in order.
public enum H2Part: Equatable {
    /// A header block: the request's or response's head (a 1xx one is interim), or its
    /// trailers (with `endStream`).
    case headers([H2Field], endStream: Bool)
    case data(ByteBuffer)
    /// The stream ends here (an empty DATA frame with END_STREAM).
    case end
}

public struct H2Output {
    public var upstream: [H2Part] = []
    public var guest: [H2Part] = []
    public var rewriteEvents: [RewriteEvent] = []
    public var maskEvents: [MaskEvent] = []
    public var scannedBytes = 0
    public init() {}
}

/// One HTTP/2 stream through the engine. The stream's request is read as the HTTP/1.1
/// request it stands for (`:method :path HTTP/1.1`, `Host: :authority`, its fields, a body
/// as chunks, one per DATA frame, its trailers) by a `RequestRewriter` of its own, so every
/// rule of the HTTP/1.1 path holds unchanged: Host = SNI, the sites and forms, the inject
/// switches, passthrough, a placeholder split across DATA frames. Its response goes through
/// a `ResponseMasker` of its own the same way. What the two emit is read back into header
/// blocks and DATA (slices of the input where nothing changed).
///
/// The stream's own rules come first: exactly one `:authority` (a `host` field must agree
/// with it), no CONNECT (RFC 8441 WebSockets are not read), and no CR, LF or NUL in any
/// field (RFC 9113 §8.2.1): anything else is a `framingError` and the stream is reset.
public final class HTTP2Exchange {
    let rewriter: RequestRewriter
    let masker: ResponseMasker
    var requestReader = H1MessageReader(isRequest: true)
    var responseReader = H1MessageReader(isRequest: false)
    var requestOutput = RewriteOutput()
    var maskOutput = MaskOutput()
    var scheme = "https"
    /// The request's own `content-length`, restored upstream when its body cannot change.
    var requestLength: String?
    var responseLength: String?
    var responseCoding: String?
    var requestBody = false
    var responseBody = false
    /// Whether a secret may be substituted into a body on this stream (then the request's
    /// `content-length` is dropped: the body's length may change).
    let bodyMayChange: Bool
    /// Responses are to come without a content coding (masked streams).
    let identityResponses: Bool
    public private(set) var requestFailed = false
    public private(set) var responseFailed = false
    public private(set) var requestEnded = false

    /// `secrets`: the policy's, compiled once and shared by its connections and streams.
    public init(
        identity: ConnectionIdentity, secrets: SecretSet, configuration: RewriterConfiguration = RewriterConfiguration(),
        heldBodyBudget: HeldBodyBudget? = nil, masking: Bool
    ) {
        rewriter = RequestRewriter(identity: identity, secrets: secrets, configuration: configuration, mode: .http, heldBodyBudget: heldBodyBudget)
        masker = ResponseMasker(secrets: secrets, masking: masking)
        bodyMayChange = secrets.secrets.contains { $0.inject.body }
        identityResponses = configuration.identityResponses
    }

    /// The same, compiling `secrets` for this exchange alone (tools and tests).
    public convenience init(
        identity: ConnectionIdentity, secrets: [Secret], configuration: RewriterConfiguration = RewriterConfiguration(),
        heldBodyBudget: HeldBodyBudget? = nil, masking: Bool
    ) {
        self.init(identity: identity, secrets: SecretSet(secrets), configuration: configuration, heldBodyBudget: heldBodyBudget, masking: masking)
    }

    /// Whether the request was refused (violation, host mismatch, framing): reset the stream.
    public var requestBlocked: Bool { requestFailed || rewriter.status == .blocked }

    public var isMasking: Bool { masker.masking }

    // MARK: request

    public func requestHeaders(_ fields: [H2Field], endStream: Bool, into output: inout H2Output) {
        guard !requestBlocked else { return }
        var method: String?
        var path: String?
        var authority: [String] = []
        var hosts: [String] = []
        var head = ""
        var regular: [H2Field] = []
        regular.reserveCapacity(fields.count)
        for field in fields {
            guard Self.isClean(field) else { return failRequest(.controlCharacter, &output) }
            switch field.name {
            case ":method": method = field.value
            case ":path": path = field.value
            case ":scheme": scheme = field.value
            case ":authority": authority.append(field.value)
            case "host": hosts.append(field.value)
            case "content-length": requestLength = field.value
            case "grpc-accept-encoding" where identityResponses:
                // gRPC's own message compression would hide values from masking too.
                regular.append(H2Field(field.name, "identity"))
            default:
                if field.name.hasPrefix(":") { return failRequest(.malformedHTTP2Request, &output) }
                regular.append(field)
            }
        }
        guard let method, method != "CONNECT", let path, !path.isEmpty, authority.count == 1 else {
            return failRequest(authority.isEmpty ? .missingHost : authority.count > 1 ? .duplicateHost : .malformedHTTP2Request, &output)
        }
        requestBody = !endStream
        head.reserveCapacity(256)
        head += method + " " + path + " HTTP/1.1\r\nHost: " + authority[0] + "\r\n"
        // A `host` equal to the authority says nothing more; another one is a second Host,
        // which the rewriter refuses.
        for host in hosts where HostName.normalize(host) != HostName.normalize(authority[0]) {
            head += "Host: " + host + "\r\n"
        }
        for field in regular { head += field.name + ": " + field.value + "\r\n" }
        if requestBody { head += "Transfer-Encoding: chunked\r\n" }
        head += "\r\n"
        let length = bodyMayChange ? nil : requestLength
        let scheme = scheme
        requestReader.restore = { lines in Self.restoreRequest(lines, scheme: scheme, length: length) }
        feedRequest(ByteBuffer(string: head), &output)
        if endStream { requestEnded = true }
    }

    public func requestData(_ data: ByteBuffer, endStream: Bool, into output: inout H2Output) {
        guard !requestBlocked, requestBody, !requestEnded else { return }
        if data.readableBytes > 0 {
            feedRequest(ByteBuffer(string: String(data.readableBytes, radix: 16) + "\r\n"), &output)
            feedRequest(data, &output)
            feedRequest(Self.crlf, &output)
        }
        if endStream {
            requestEnded = true
            feedRequest(Self.lastChunk, &output)
        }
    }

    public func requestTrailers(_ fields: [H2Field], into output: inout H2Output) {
        guard !requestBlocked, !requestEnded else { return }
        requestEnded = true
        guard requestBody else { return failRequest(.malformedHTTP2Request, &output) }
        var text = "0\r\n"
        for field in fields {
            guard Self.isClean(field), !field.name.hasPrefix(":") else { return failRequest(.malformedHTTP2Request, &output) }
            text += field.name + ": " + field.value + "\r\n"
        }
        feedRequest(ByteBuffer(string: text + "\r\n"), &output)
    }

    /// The guest's stream ended early (reset or closed): nothing more goes upstream.
    public func requestAborted() {
        requestEnded = true
    }

    private func feedRequest(_ buffer: ByteBuffer, _ output: inout H2Output) {
        rewriter.consume(buffer, into: &requestOutput)
        for expected in requestOutput.expectedResponses { masker.expect(expected) }
        requestOutput.expectedResponses.removeAll(keepingCapacity: true)
        for event in requestOutput.events {
            if case .substituted = event { masker.activate() }
            output.rewriteEvents.append(event)
        }
        requestOutput.events.removeAll(keepingCapacity: true)
        for piece in requestOutput.upstream {
            requestReader.consume(piece, into: &output.upstream)
        }
        requestOutput.upstream.removeAll(keepingCapacity: true)
        if requestReader.failed && !requestFailed {
            requestFailed = true
            output.rewriteEvents.append(.framingError(.malformedHTTP2Request, request: nil))
        }
    }

    private func failRequest(_ error: FramingError, _ output: inout H2Output) {
        requestFailed = true
        output.rewriteEvents.append(.framingError(error, request: nil))
    }

    // MARK: response

    public func responseHeaders(_ fields: [H2Field], endStream: Bool, into output: inout H2Output) {
        guard !responseFailed else { return }
        var status: String?
        var head = ""
        var regular: [H2Field] = []
        for field in fields {
            guard Self.isClean(field) else { return failResponse(.malformedHead, "a CR, LF or NUL in a field", &output) }
            switch field.name {
            case ":status": status = field.value
            case "content-length": responseLength = field.value
            default:
                if field.name.hasPrefix(":") { return failResponse(.malformedHead, "a pseudo-header other than :status", &output) }
                if field.name == "content-encoding" { responseCoding = field.value }
                if field.name == "grpc-encoding", field.value != "identity", masker.masking {
                    return failResponse(.valueInResponse, "gRPC messages compressed with \(field.value)", &output)
                }
                regular.append(field)
            }
        }
        guard let status, status.utf8.count == 3, let code = Int(status) else {
            return failResponse(.malformedHead, "no valid :status", &output)
        }
        let interim = code >= 100 && code < 200
        head += "HTTP/1.1 " + status + " -\r\n"
        for field in regular { head += field.name + ": " + field.value + "\r\n" }
        if !interim {
            responseBody = !endStream
            head += responseBody ? "Transfer-Encoding: chunked\r\n" : "Content-Length: 0\r\n"
        }
        head += "\r\n"
        let coding = responseCoding
        let length = responseLength
        responseReader.restore = { fields in Self.restoreResponse(fields, length: length, coding: coding) }
        feedResponse(ByteBuffer(string: head), &output)
        if !interim && endStream { feedResponseEnd(&output) }
    }

    public func responseData(_ data: ByteBuffer, endStream: Bool, into output: inout H2Output) {
        guard !responseFailed, responseBody else { return }
        if data.readableBytes > 0 {
            feedResponse(ByteBuffer(string: String(data.readableBytes, radix: 16) + "\r\n"), &output)
            feedResponse(data, &output)
            feedResponse(Self.crlf, &output)
        }
        if endStream {
            feedResponse(Self.lastChunk, &output)
            feedResponseEnd(&output)
        }
    }

    public func responseTrailers(_ fields: [H2Field], into output: inout H2Output) {
        guard !responseFailed else { return }
        guard responseBody else { return failResponse(.malformedHead, "trailers on a response without a body", &output) }
        var text = "0\r\n"
        for field in fields {
            guard Self.isClean(field), !field.name.hasPrefix(":") else {
                return failResponse(.malformedHead, "a pseudo-header or a CR, LF or NUL in the trailers", &output)
            }
            text += field.name + ": " + field.value + "\r\n"
        }
        feedResponse(ByteBuffer(string: text + "\r\n"), &output)
        feedResponseEnd(&output)
    }

    /// The response is whole: what the masker held back is decided now.
    private func feedResponseEnd(_ output: inout H2Output) {
        masker.finish(into: &maskOutput)
        collectResponse(&output)
    }

    private func feedResponse(_ buffer: ByteBuffer, _ output: inout H2Output) {
        masker.consume(buffer, into: &maskOutput)
        collectResponse(&output)
    }

    private func collectResponse(_ output: inout H2Output) {
        output.scannedBytes += maskOutput.scannedBytes
        maskOutput.scannedBytes = 0
        for piece in maskOutput.guest { responseReader.consume(piece, into: &output.guest) }
        maskOutput.guest.removeAll(keepingCapacity: true)
        for event in maskOutput.events {
            if case .framingError = event { responseFailed = true }
            output.maskEvents.append(event)
        }
        maskOutput.events.removeAll(keepingCapacity: true)
        if responseReader.failed && !responseFailed {
            failResponse(.malformedHead, "the masked response could not be read back", &output)
        }
    }

    private func failResponse(_ error: ResponseFramingError, _ detail: String, _ output: inout H2Output) {
        responseFailed = true
        output.maskEvents.append(.framingError(error, detail: detail))
    }

    // MARK: back to HTTP/2

    static let crlf = ByteBuffer(string: "\r\n")
    static let lastChunk = ByteBuffer(string: "0\r\n\r\n")

    static func isClean(_ field: H2Field) -> Bool {
        !field.name.isEmpty && !field.value.utf8.contains { $0 == 0x0D || $0 == 0x0A || $0 == 0x00 }
            && !field.name.utf8.contains { $0 <= 0x20 || $0 == 0x7F || ($0 >= 0x41 && $0 <= 0x5A) }
    }

    /// The rewritten request head as HTTP/2 fields: the request line and Host become
    /// pseudo-headers again; the chunked framing goes.
    static func restoreRequest(_ lines: H1MessageReader.Head, scheme: String, length: String?) -> [H2Field]? {
        let parts = lines.startLine.split(separator: " ", maxSplits: 2, omittingEmptySubsequences: false)
        guard parts.count == 3 else { return nil }
        var fields = [H2Field(":method", String(parts[0])), H2Field(":scheme", scheme), H2Field(":path", String(parts[1]))]
        var authority = false
        var rest: [H2Field] = []
        for (name, value) in lines.fields {
            switch name {
            case "host":
                guard !authority else { return nil }
                authority = true
                fields.append(H2Field(":authority", value))
            case "transfer-encoding", "content-length": continue
            default: rest.append(H2Field(name, value))
            }
        }
        guard authority else { return nil }
        if let length { rest.append(H2Field("content-length", length)) }
        return fields + rest
    }

    /// The masked response head as HTTP/2 fields. The upstream's `content-length` is kept
    /// when the coding is unchanged (masking keeps lengths); a decoded body has none.
    static func restoreResponse(_ lines: H1MessageReader.Head, length: String?, coding: String?) -> [H2Field]? {
        let parts = lines.startLine.split(separator: " ", maxSplits: 2, omittingEmptySubsequences: false)
        guard parts.count >= 2 else { return nil }
        var fields = [H2Field(":status", String(parts[1]))]
        var outCoding: String?
        for (name, value) in lines.fields {
            switch name {
            case "transfer-encoding", "content-length": continue
            case "content-encoding":
                outCoding = value
                fields.append(H2Field(name, value))
            default: fields.append(H2Field(name, value))
            }
        }
        if let length, outCoding == coding { fields.append(H2Field("content-length", length)) }
        return fields
    }
}

@available(*, unavailable)
extension HTTP2Exchange: Sendable {}

/// Reads back what the rewriter or the masker emitted for one HTTP/2 stream: an HTTP/1.1
/// head (and interim heads before a response's final one), then a chunked body (data as
/// slices of what it emitted) and trailers. It only ever reads the engine's own output.
struct H1MessageReader {
    struct Head {
        var startLine: Substring
        var fields: [(String, String)]
    }

    enum State {
        case head
        case chunkSize
        case chunkData(remaining: Int)
        case chunkEnd(remaining: Int)
        case trailers
        case done
    }

    let isRequest: Bool
    var state = State.head
    var line: [UInt8] = []
    var chunked = false
    var failed = false
    var restore: (Head) -> [H2Field]? = { _ in nil }

    init(isRequest: Bool) {
        self.isRequest = isRequest
    }

    /// Accumulated bytes of a head or trailer block (the engine bounds both).
    mutating func consume(_ buffer: ByteBuffer, into parts: inout [H2Part]) {
        var input = buffer
        while input.readableBytes > 0, !failed {
            switch state {
            case .done:
                failed = true
            case .head, .trailers:
                guard blockEnd(&input) else { return }
                let block = line
                line.removeAll(keepingCapacity: true)
                if case .head = state { head(block, &parts) } else { trailers(block, &parts) }
            case .chunkSize:
                guard let newline = input.readableBytesView.firstIndex(of: 0x0A) else {
                    line.append(contentsOf: input.readableBytesView)
                    input.moveReaderIndex(forwardBy: input.readableBytes)
                    guard line.count < 64 else { failed = true; return }
                    continue
                }
                let count = newline - input.readerIndex + 1
                line.append(contentsOf: input.readSlice(length: count)!.readableBytesView)
                let text = String(decoding: line.prefix { $0 != 0x0D && $0 != 0x3B }, as: UTF8.self)
                line.removeAll(keepingCapacity: true)
                guard let size = Int(text, radix: 16) else { failed = true; return }
                state = size == 0 ? .trailers : .chunkData(remaining: size)
            case .chunkData(let remaining):
                let n = min(remaining, input.readableBytes)
                parts.append(.data(input.readSlice(length: n)!))
                state = n == remaining ? .chunkEnd(remaining: 2) : .chunkData(remaining: remaining - n)
            case .chunkEnd(let remaining):
                let n = min(remaining, input.readableBytes)
                input.moveReaderIndex(forwardBy: n)
                state = n == remaining ? .chunkSize : .chunkEnd(remaining: remaining - n)
            }
        }
    }

    /// Gathers bytes into `line` up to a CRLF CRLF (or, for trailers, a lone CRLF).
    private mutating func blockEnd(_ input: inout ByteBuffer) -> Bool {
        while let byte = input.readInteger(as: UInt8.self) {
            line.append(byte)
            if line.count > 256 * 1024 {
                failed = true
                return false
            }
            if byte == 0x0A {
                if line.count == 2 && line[0] == 0x0D { return true }  // an empty block (trailers)
                if line.count >= 4 && line[line.count - 4] == 0x0D && line[line.count - 3] == 0x0A && line[line.count - 2] == 0x0D {
                    return true
                }
            }
        }
        return false
    }

    private static func parse(_ block: [UInt8]) -> Head? {
        var lines = String(decoding: block, as: UTF8.self).split(separator: "\r\n", omittingEmptySubsequences: false)
        while lines.last?.isEmpty == true { lines.removeLast() }
        guard let first = lines.first else { return nil }
        var fields: [(String, String)] = []
        for line in lines.dropFirst() {
            guard let colon = line.firstIndex(of: ":") else { return nil }
            let name = line[..<colon].lowercased()
            fields.append((name, String(line[line.index(after: colon)...].drop(while: { $0 == " " || $0 == "\t" }))))
        }
        return Head(startLine: first, fields: fields)
    }

    private mutating func head(_ block: [UInt8], _ parts: inout [H2Part]) {
        guard let head = Self.parse(block), let fields = restore(head) else {
            failed = true
            return
        }
        chunked = head.fields.contains { $0.0 == "transfer-encoding" }
        if !isRequest, let status = fields.first?.value, status.first == "1" {
            parts.append(.headers(fields, endStream: false))
            return  // interim: the final head follows
        }
        parts.append(.headers(fields, endStream: !chunked))
        state = chunked ? .chunkSize : .done
    }

    private mutating func trailers(_ block: [UInt8], _ parts: inout [H2Part]) {
        state = .done
        guard block.count > 2 else {
            parts.append(.end)
            return
        }
        var text = Array("-\r\n".utf8)
        text.append(contentsOf: block)
        guard let head = Self.parse(text) else {
            failed = true
            return
        }
        parts.append(.headers(head.fields.map { H2Field($0.0, $0.1) }, endStream: true))
    }
}
