import KeyholeEngine
import KeyholePolicy
import NIOCore
import Testing

/// One HTTP/2 stream through the engine, without sockets: header blocks and DATA in,
/// header blocks and DATA out, with the HTTP/1.1 rules.
@Suite("HTTP/2 exchange")
struct HTTP2ExchangeTests {
    let placeholder = token.placeholder

    func request(_ path: String = "/v1", authority: String = "api.example.com", method: String = "GET", _ extra: [H2Field] = []) -> [H2Field] {
        [H2Field(":method", method), H2Field(":scheme", "https"), H2Field(":path", path), H2Field(":authority", authority)] + extra
    }

    func request(_ extra: [H2Field]) -> [H2Field] { request("/v1", extra) }


    func exchange(_ secrets: [Secret] = [token], sni: String = "api.example.com", masking: Bool = true) -> HTTP2Exchange {
        HTTP2Exchange(identity: .verifiedTLS(sni: sni), secrets: secrets, masking: masking)
    }

    static func fields(_ part: H2Part?) -> [H2Field] {
        if case .headers(let fields, _)? = part { return fields }
        return []
    }

    static func value(_ part: H2Part?, _ name: String) -> String? { fields(part).first { $0.name == name }?.value }

    static func data(_ parts: [H2Part]) -> String {
        parts.map { if case .data(let b) = $0 { String(buffer: b) } else { "" } }.joined()
    }

    @Test func aHeaderPlaceholderIsSubstitutedAndThePseudoHeadersComeBack() {
        let stream = exchange()
        var output = H2Output()
        stream.requestHeaders(request("/v1?x=1", [H2Field("authorization", "Bearer \(placeholder)"), H2Field("accept", "*/*")]), endStream: true, into: &output)
        #expect(!stream.requestBlocked)
        #expect(output.upstream.count == 1)
        guard case .headers(let fields, let end)? = output.upstream.first else {
            Issue.record("no headers")
            return
        }
        #expect(end)
        #expect(Array(fields.prefix(4)) == request("/v1?x=1"))
        #expect(Self.value(output.upstream.first, "authorization") == "Bearer real-token-value")
        #expect(Self.value(output.upstream.first, "accept") == "*/*")
        #expect(output.rewriteEvents.contains { if case .substituted(secret: "TOKEN", site: .header, _) = $0 { true } else { false } })
    }

    @Test func theAuthorityMustBeOneAndTheSNI() {
        for (fields, reason) in [
            (request(authority: "other.example.com", [H2Field("authorization", placeholder)]), "violation"),
            (request(authority: "other.example.com"), "mismatch"),
            (request([H2Field("host", "other.example.com")]), "framing"),
            ([H2Field(":method", "GET"), H2Field(":scheme", "https"), H2Field(":path", "/")], "framing"),
            (request() + [H2Field(":authority", "api.example.com")], "framing"),
            (request(method: "CONNECT"), "framing"),
            (request([H2Field("x", "a\r\nhost: evil.example.com")]), "framing"),
        ] {
            let stream = exchange()
            var output = H2Output()
            stream.requestHeaders(fields, endStream: true, into: &output)
            #expect(stream.requestBlocked, "\(fields)")
            #expect(output.upstream.isEmpty, "\(fields)")
            let kinds = output.rewriteEvents.map { event -> String in
                switch event {
                case .violation: "violation"
                case .hostMismatch: "mismatch"
                case .framingError: "framing"
                default: "other"
                }
            }
            #expect(kinds.contains(reason), "\(fields): \(output.rewriteEvents)")
        }
        // A host equal to the authority is only dropped.
        let stream = exchange()
        var output = H2Output()
        stream.requestHeaders(request([H2Field("host", "API.example.com")]), endStream: true, into: &output)
        #expect(!stream.requestBlocked)
        #expect(Self.value(output.upstream.first, "host") == nil)
    }

    @Test func aPlaceholderSplitAcrossDataFramesIsAViolationWithoutInjectBody() {
        let stream = exchange()
        var output = H2Output()
        stream.requestHeaders(request(method: "POST"), endStream: false, into: &output)
        let half = placeholder.utf8.count / 2
        stream.requestData(ByteBuffer(string: "x=" + String(placeholder.prefix(half))), endStream: false, into: &output)
        #expect(!stream.requestBlocked)
        stream.requestData(ByteBuffer(string: String(placeholder.dropFirst(half)) + "&y=2"), endStream: true, into: &output)
        #expect(stream.requestBlocked)
        #expect(output.rewriteEvents.contains { if case .violation(let v) = $0 { v.site == .body } else { false } })
        #expect(!Self.data(output.upstream).contains(placeholder))
    }

    @Test func bodySubstitutionStreamsAcrossFramesAndDropsTheLength() {
        var inject = Injection()
        inject.body = true
        let stream = exchange([secret("TOKEN", value: "real-token-value", inject: inject)])
        var output = H2Output()
        stream.requestHeaders(request(method: "POST", [H2Field("content-length", "40")]), endStream: false, into: &output)
        #expect(Self.value(output.upstream.first, "content-length") == nil)
        let text = "a=" + placeholder + "&b=" + placeholder
        for piece in stride(from: 0, to: text.utf8.count, by: 5) {
            let slice = String(Array(text.utf8)[piece..<min(piece + 5, text.utf8.count)].map { Character(UnicodeScalar($0)) })
            stream.requestData(ByteBuffer(string: slice), endStream: false, into: &output)
        }
        stream.requestData(ByteBuffer(), endStream: true, into: &output)
        #expect(!stream.requestBlocked)
        #expect(Self.data(output.upstream) == "a=real-token-value&b=real-token-value")
        #expect(output.upstream.last == .end)
    }

    @Test func theLengthStaysWhereTheBodyCannotChange() {
        let stream = exchange()
        var output = H2Output()
        stream.requestHeaders(request(method: "POST", [H2Field("content-length", "5")]), endStream: false, into: &output)
        stream.requestData(ByteBuffer(string: "hello"), endStream: true, into: &output)
        #expect(Self.value(output.upstream.first, "content-length") == "5")
        #expect(Self.data(output.upstream) == "hello")
    }

    @Test func requestTrailersAreReadLikeChunkedTrailers() {
        let stream = exchange()
        var output = H2Output()
        stream.requestHeaders(request(method: "POST"), endStream: false, into: &output)
        stream.requestData(ByteBuffer(string: "body"), endStream: false, into: &output)
        stream.requestTrailers([H2Field("x-checksum", "abc")], into: &output)
        #expect(!stream.requestBlocked)
        #expect(output.upstream.last == .headers([H2Field("x-checksum", "abc")], endStream: true))
    }

    @Test func responsesAreMaskedInHeadersDataAndTrailers() {
        let stream = exchange()
        var output = H2Output()
        stream.requestHeaders(request([H2Field("authorization", placeholder)]), endStream: true, into: &output)
        stream.responseHeaders([H2Field(":status", "200"), H2Field("x-token", "real-token-value"), H2Field("content-length", "29")], endStream: false, into: &output)
        let body = "{\"t\":\"real-token-value\"}     "
        for piece in stride(from: 0, to: body.utf8.count, by: 4) {
            let slice = String(Array(body.utf8)[piece..<min(piece + 4, body.utf8.count)].map { Character(UnicodeScalar($0)) })
            stream.responseData(ByteBuffer(string: slice), endStream: false, into: &output)
        }
        stream.responseTrailers([H2Field("grpc-status", "0"), H2Field("x-echo", "real-token-value")], into: &output)
        #expect(!stream.responseFailed)
        let all = output.guest.map { part -> String in
            switch part {
            case .headers(let fields, _): return fields.map { "\($0.name): \($0.value)" }.joined(separator: "\n")
            case .data(let b): return String(buffer: b)
            case .end: return "<end>"
            }
        }.joined(separator: "\n")
        #expect(!all.contains("real-token-value"), "\(all)")
        #expect(Self.value(output.guest.first, "x-token")?.hasPrefix(placeholder) == true, "\(all)")
        #expect(Self.value(output.guest.first, "content-length") == "29")
        #expect(Self.data(output.guest).count == 29)
        #expect(output.guest.last.map { if case .headers(_, endStream: true) = $0 { true } else { false } } == true)
        #expect(output.maskEvents.count >= 3)
    }

    @Test func aTrailersOnlyResponseAndInterimHeadsPass() {
        let stream = exchange(masking: false)
        var output = H2Output()
        stream.requestHeaders(request(), endStream: true, into: &output)
        stream.responseHeaders([H2Field(":status", "103"), H2Field("link", "</a>")], endStream: false, into: &output)
        stream.responseHeaders([H2Field(":status", "200"), H2Field("grpc-status", "5")], endStream: true, into: &output)
        #expect(output.guest.count == 2, "\(output.guest)")
        #expect(output.guest.first == .headers([H2Field(":status", "103"), H2Field("link", "</a>")], endStream: false))
        #expect(output.guest.last == .headers([H2Field(":status", "200"), H2Field("grpc-status", "5")], endStream: true))
    }

    @Test func compressedGRPCMessagesAreNotForwardedWhereValuesAreMasked() {
        var configuration = RewriterConfiguration()
        configuration.identityResponses = true
        let stream = HTTP2Exchange(identity: .verifiedTLS(sni: "api.example.com"), secrets: [token], configuration: configuration, masking: true)
        var output = H2Output()
        stream.requestHeaders(request(method: "POST", [H2Field("grpc-accept-encoding", "identity,deflate,gzip")]), endStream: false, into: &output)
        #expect(Self.value(output.upstream.first, "grpc-accept-encoding") == "identity")
        stream.responseHeaders([H2Field(":status", "200"), H2Field("grpc-encoding", "gzip")], endStream: false, into: &output)
        #expect(stream.responseFailed)
        #expect(output.guest.isEmpty)
        #expect(output.maskEvents.contains { if case .framingError(.valueInResponse, _) = $0 { true } else { false } })
    }

    @Test func aQueryPlaceholderInThePathFollowsInjectQuery() {
        var inject = Injection()
        inject.query = true
        let on = exchange([secret("TOKEN", value: "real-token-value", inject: inject)])
        var output = H2Output()
        on.requestHeaders(request("/v1?key=\(placeholder)&x=1"), endStream: true, into: &output)
        #expect(Self.value(output.upstream.first, ":path") == "/v1?key=real-token-value&x=1")
        // Off (the default): a violation, and nothing goes upstream.
        let off = exchange()
        var refused = H2Output()
        off.requestHeaders(request("/v1?key=\(placeholder)"), endStream: true, into: &refused)
        #expect(off.requestBlocked)
        #expect(refused.upstream.isEmpty)
        #expect(refused.rewriteEvents.contains { if case .violation(let v) = $0 { v.site == .query } else { false } })
    }
}
