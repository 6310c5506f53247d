import KeyholeEngine
import KeyholePolicy
import CompressNIO
import Foundation
import NIOCore
import Testing

/// The upstream → guest direction: every real value comes back as its placeholder.
@Suite("Response masking")
struct ResponseMaskingTests {
    static let value = "real-token-value"
    static let placeholder = "$MSB_TOKEN"
    let secrets = [secret("TOKEN", value: ResponseMaskingTests.value)]

    struct Outcome {
        var bytes: [UInt8]
        var events: [MaskEvent]
        var text: String { String(decoding: bytes, as: UTF8.self) }
        var masked: [(String, MaskSite, PlaceholderForm)] {
            events.compactMap { if case .masked(let s, let site, let form) = $0 { return (s, site, form) } else { return nil } }
        }
        var errors: [ResponseFramingError] {
            events.compactMap { if case .framingError(let e, _) = $0 { return e } else { return nil } }
        }
    }

    func run(
        _ response: String, requests: [ExpectedResponse] = [ExpectedResponse()], chunk: Int? = nil, masking: Bool = true,
        finish: Bool = true, secrets: [Secret]? = nil
    ) -> Outcome {
        run(Array(response.utf8), requests: requests, chunk: chunk, masking: masking, finish: finish, secrets: secrets)
    }

    func run(
        _ response: [UInt8], requests: [ExpectedResponse] = [ExpectedResponse()], chunk: Int? = nil, masking: Bool = true,
        finish: Bool = true, secrets: [Secret]? = nil
    ) -> Outcome {
        let masker = ResponseMasker(secrets: secrets ?? self.secrets, masking: masking)
        for request in requests { masker.expect(request) }
        var output = MaskOutput()
        let size = max(1, chunk ?? response.count)
        var offset = 0
        while offset < response.count {
            masker.consume(ByteBuffer(bytes: response[offset..<min(response.count, offset + size)]), into: &output)
            offset += size
        }
        if finish { masker.finish(into: &output) }
        return Outcome(bytes: output.guest.flatMap { Array($0.readableBytesView) }, events: output.events)
    }

    static func padded(_ length: Int) -> String {
        String((placeholder + String(repeating: "*", count: max(0, length - placeholder.count))).prefix(length))
    }

    static func base64(_ s: String, urlSafe: Bool = false) -> String {
        var text = Data64.encode(Array(s.utf8))
        if urlSafe { text = text.replacingOccurrences("+", "-").replacingOccurrences("/", "_") }
        return text
    }

    @Test func aResponseWithoutValuesArrivesByteIdenticalHoweverItIsSplit() {
        let response = "HTTP/1.1 200 OK\r\nContent-Length: 27\r\n\r\n{\"ok\":true,\"n\":\"%24\\u0041\"}"
            + "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3;x=y\r\nrea\r\n0\r\nX-T: 1\r\n\r\n"
        for chunk in [nil, 1, 2, 5, 13] as [Int?] {
            let outcome = run(response, requests: [ExpectedResponse(), ExpectedResponse()], chunk: chunk)
            #expect(outcome.text == response, "chunk \(chunk ?? 0)")
            #expect(outcome.events.isEmpty)
        }
    }

    @Test func everyFormOfTheValueIsMaskedInTheBodyKeepingItsLength() {
        let v = Self.value
        let forms: [(String, PlaceholderForm)] = [
            (v, .raw),
            ("real%2Dtoken%2dvalue", .percentEncoded),
            ("%72%65%61%6C-token-value", .percentEncoded),
            ("\\u0072eal-token-\\u0076alue", .jsonEscaped),
            ("real\\u002dtoken\\u002Dvalue", .jsonEscaped),
        ]
        for (form, expected) in forms {
            let body = "{\"echo\":\"\(form)\"}"
            let response = "HTTP/1.1 200 OK\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)"
            for chunk in [nil, 1, 7] as [Int?] {
                let outcome = run(response, chunk: chunk)
                #expect(outcome.text == "HTTP/1.1 200 OK\r\nContent-Length: \(body.utf8.count)\r\n\r\n{\"echo\":\"\(Self.padded(form.utf8.count))\"}", "\(form) chunk \(chunk ?? 0)")
                #expect(outcome.masked.map(\.2) == [expected])
                #expect(outcome.masked.first?.1 == .body)
            }
        }
    }

    @Test func aSlashEscapedValueIsMasked() {
        let slashy = [secret("KEY", value: "ab/cd+ef/gh")]
        let body = "{\"k\":\"ab\\/cd+ef\\/gh\"}"
        let outcome = run("HTTP/1.1 200 OK\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)", secrets: slashy)
        #expect(!outcome.text.contains("cd+ef"))
        #expect(outcome.masked.first?.2 == .jsonEscaped)
    }

    @Test func headValuesAreReplacedByThePlaceholderExactly() {
        let response = "HTTP/1.1 302 Found\r\nLocation: https://example.com/cb?token=\(Self.value)&x=1\r\nX-Echo: Bearer real%2Dtoken%2Dvalue\r\nContent-Length: 0\r\n\r\n"
        let outcome = run(response, chunk: 3)
        #expect(outcome.text == "HTTP/1.1 302 Found\r\nLocation: https://example.com/cb?token=$MSB_TOKEN&x=1\r\nX-Echo: Bearer $MSB_TOKEN\r\nContent-Length: 0\r\n\r\n")
        #expect(outcome.masked.map(\.1) == [.head, .head])
    }

    @Test func aValueSplitAcrossChunksIsMaskedAndTheChunkSizesStayTrue() {
        let v = Array(Self.value.utf8)
        let first = "echo: " + String(decoding: v[0..<7], as: UTF8.self)
        let second = String(decoding: v[7...], as: UTF8.self) + " end"
        let response = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + String(first.utf8.count, radix: 16) + "\r\n" + first + "\r\n"
            + String(second.utf8.count, radix: 16) + "\r\n" + second + "\r\n0\r\n\r\n"
        for chunk in [nil, 1, 4] as [Int?] {
            let outcome = run(response, chunk: chunk)
            #expect(!outcome.text.contains("real-to"))
            #expect(!outcome.text.contains("ken-value"))
            let masked = Self.padded(v.count)
            let expected = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + String(first.utf8.count, radix: 16) + "\r\necho: " + masked.prefix(7) + "\r\n"
                + String(second.utf8.count, radix: 16) + "\r\n" + masked.dropFirst(7) + " end\r\n0\r\n\r\n"
            #expect(outcome.text == expected, "chunk \(chunk ?? 0)")
        }
    }

    @Test func chunkExtensionsAndTrailersAreMaskedToo() {
        let response = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;echo=\(Self.value)\r\nok\r\n0\r\nX-Echo: \(Self.value)\r\n\r\n"
        for chunk in [nil, 1, 5] as [Int?] {
            let outcome = run(response, chunk: chunk)
            let masked = Self.padded(Self.value.utf8.count)
            // An extension is framing, masked exactly; trailers stream like the body.
            #expect(outcome.text == "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;echo=$MSB_TOKEN\r\nok\r\n0\r\nX-Echo: \(masked)\r\n\r\n")
        }
    }

    @Test func base64AtEveryAlignmentIncludingBasicCredentialsIsMasked() {
        for prefix in ["", "u", "us", "user:", "x:"] {
            for urlSafe in [false, true] {
                let encoded = Self.base64(prefix + Self.value + "!", urlSafe: urlSafe)
                let body = "{\"auth\":\"Basic \(encoded)\"}"
                let outcome = run("HTTP/1.1 200 OK\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)", chunk: 5)
                #expect(outcome.masked.map(\.2) == [.base64], "\(prefix) \(urlSafe)")
                // The guest decodes something that is not the value, of the same length.
                let returned = outcome.text.split(separator: "Basic ").last!.split(separator: "\"").first!
                #expect(returned.count == encoded.count)
                let decoded = String(decoding: Data64.decode(String(returned)), as: UTF8.self)
                #expect(!decoded.contains("token-val"), "\(prefix): \(decoded)")
                #expect(decoded.contains("$MSB_TOKEN"), "\(prefix): \(decoded)")
            }
        }
    }

    @Test func framingFollowsTheRequests() {
        // HEAD: no body though Content-Length says 5; 204 and 304 have none; 100 is interim.
        let response = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"
            + "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n" + "HTTP/1.1 200 OK\r\nContent-Length: \(Self.value.utf8.count)\r\n\r\n\(Self.value)"
        let outcome = run(response, requests: [ExpectedResponse(isHead: true), ExpectedResponse(), ExpectedResponse(), ExpectedResponse()], chunk: 6)
        #expect(outcome.errors.isEmpty)
        #expect(outcome.masked.count == 1 && outcome.text.hasSuffix(Self.padded(Self.value.utf8.count)))
        // A close-delimited body ends when the upstream closes; its tail is decided then.
        let close = run("HTTP/1.0 200 OK\r\n\r\nsome text then \(Self.value)", chunk: 4)
        #expect(close.text == "HTTP/1.0 200 OK\r\n\r\nsome text then \(Self.padded(Self.value.utf8.count))")
    }

    @Test func anUpgradeIsDecidedFromThePairNotFromAnEarlierBody() {
        let upgrade = ExpectedResponse(upgrade: ["websocket"])
        // The first response's body carries a fake 101: it is body, not a decision.
        let fake = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"
        let response = "HTTP/1.1 200 OK\r\nContent-Length: \(fake.utf8.count)\r\n\r\n\(fake)" + "HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n"
        let outcome = run(response, requests: [ExpectedResponse(), upgrade], chunk: 7)
        let decisions: [UpgradeDecision.Outcome] = outcome.events.compactMap { if case .upgrade(let o) = $0 { return o } else { return nil } }
        #expect(decisions == [.declined])
        // A 101 split into single bytes is still a 101.
        let accepted = run("HTTP/1.1 101 Switching Protocols\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\n\r\n", requests: [upgrade], chunk: 1)
        #expect(accepted.events == [.upgrade(.accepted(protocol: "websocket"))])
        // A 200 to h2c declines; a 101 nobody asked for is refused.
        #expect(run("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", requests: [ExpectedResponse(upgrade: ["h2c"])]).events == [.upgrade(.declined)])
        #expect(run("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n").errors == [.unrequestedSwitch])
        #expect(run("HTTP/1.1 200 Connection established\r\n\r\n", requests: [ExpectedResponse(isConnect: true)]).events == [.upgrade(.accepted(protocol: nil))])
    }

    @Test func serverWebSocketFramesAreMaskedAcrossFrames() {
        let upgrade = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        let v = Array(Self.value.utf8)
        // A text message in two fragments, the value split between them, a ping between.
        let frames: [UInt8] = [0x01, 10] + Array("echo: ".utf8) + v[0..<4] + [0x89, 0] + [0x80, UInt8(v.count - 4)] + v[4...]
        for chunk in [nil, 1, 3] as [Int?] {
            let outcome = run(Array(upgrade.utf8) + frames, requests: [ExpectedResponse(upgrade: ["websocket"])], chunk: chunk)
            let masked = Array(Self.padded(v.count).utf8)
            let expected: [UInt8] = [0x01, 10] + Array("echo: ".utf8) + masked[0..<4] + [0x89, 0] + [0x80, UInt8(v.count - 4)] + masked[4...]
            #expect(Array(outcome.bytes.dropFirst(upgrade.utf8.count)) == expected, "chunk \(chunk ?? 0)")
            #expect(outcome.masked.map(\.1) == [.websocket])
        }
    }

    @Test func aBodyInACodingKeyholeCannotReadIsNeverForwardedWhileMasking() {
        let br = "HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 4\r\n\r\nabcd"
        let outcome = run(br)
        #expect(outcome.errors == [.valueInResponse])
        #expect(outcome.bytes.isEmpty, "not even the head")
        // Stacked codings, and gzip to an HTTP/1.0 client (no chunked to re-frame with).
        #expect(run("HTTP/1.1 200 OK\r\nContent-Encoding: gzip, gzip\r\nContent-Length: 4\r\n\r\nabcd").errors == [.valueInResponse])
        #expect(run("HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 4\r\n\r\nabcd", requests: [ExpectedResponse(http10: true)]).errors == [.valueInResponse])
        // Without masking it is relayed as it is.
        #expect(run(br, masking: false).text == br)
    }

    @Test func gzipAndDeflateBodiesAreDecodedMaskedAndSentIdentityChunked() throws {
        let plain = Array("{\"token\":\"\(Self.value)\",\"pad\":\"\(String(repeating: "x", count: 3000))\"}".utf8)
        for (coding, compressed) in [("gzip", try Zlib.compress(plain, gzip: true)), ("deflate", try Zlib.compress(plain, gzip: false))] {
            let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: \(coding)\r\nContent-Length: \(compressed.count)\r\n\r\n"
            for chunk in [nil, 1, 17] as [Int?] {
                let outcome = run(Array(head.utf8) + compressed + Array("HTTP/1.1 204 No Content\r\n\r\n".utf8), requests: [ExpectedResponse(), ExpectedResponse()], chunk: chunk)
                #expect(outcome.errors.isEmpty, "\(coding) \(chunk ?? 0)")
                let text = outcome.text
                #expect(text.hasPrefix("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"), "\(text.prefix(120))")
                #expect(text.hasSuffix("0\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"))
                // De-chunk: the decoded body, the value masked.
                let body = Self.dechunk(String(text.split(separator: "\r\n\r\n", maxSplits: 1)[1]))
                #expect(body == String(decoding: plain, as: UTF8.self).replacingOccurrences(Self.value, Self.padded(Self.value.utf8.count)), "\(coding) \(chunk ?? 0)")
                #expect(outcome.masked.map(\.1) == [.body])
            }
        }
        // A gzip body that is corrupt is refused.
        let bad = "HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 10\r\n\r\n0123456789"
        #expect(run(bad).errors == [.undecodableBody])
    }

    @Test func aDecompressionBombIsRefused() throws {
        let bomb = try Zlib.compress([UInt8](repeating: 0x61, count: 16 << 20), gzip: true)
        let head = "HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: \(bomb.count)\r\n\r\n"
        let outcome = run(Array(head.utf8) + bomb, chunk: 4096)
        #expect(outcome.errors == [.undecodableBody])
        #expect(outcome.bytes.count < 4 << 20, "what went out before the refusal is bounded")
    }

    static func dechunk(_ text: String) -> String {
        let bytes = Array(text.utf8)
        var i = 0
        var out: [UInt8] = []
        while let lf = bytes[i...].firstIndex(of: 0x0A) {
            let size = Int(String(decoding: bytes[i..<lf], as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines), radix: 16) ?? 0
            if size == 0 { break }
            out += bytes[(lf + 1)..<(lf + 1 + size)]
            i = lf + 1 + size + 2
        }
        return String(decoding: out, as: UTF8.self)
    }

    @Test func malformedResponsesFailClosed() {
        #expect(run("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc").errors == [.conflictingLength])
        #expect(run("SSH-2.0-OpenSSH\r\n\r\n").errors == [.malformedHead])
        #expect(run("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").errors == [.malformedChunk])
        let huge = "HTTP/1.1 200 OK\r\n" + String(repeating: "X: y\r\n", count: 20000)
        #expect(run(huge, chunk: 4096).errors == [.headTooLarge])
    }
}

/// base64 for the tests, independent of the engine's.
enum Data64 {
    static let table = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)
    static func encode(_ bytes: [UInt8]) -> String {
        var out: [UInt8] = []
        var i = 0
        while i < bytes.count {
            let n = min(3, bytes.count - i)
            let b0 = Int(bytes[i]), b1 = n > 1 ? Int(bytes[i + 1]) : 0, b2 = n > 2 ? Int(bytes[i + 2]) : 0
            let v = b0 << 16 | b1 << 8 | b2
            out.append(table[v >> 18 & 63])
            out.append(table[v >> 12 & 63])
            out.append(n > 1 ? table[v >> 6 & 63] : UInt8(ascii: "="))
            out.append(n > 2 ? table[v & 63] : UInt8(ascii: "="))
            i += 3
        }
        return String(decoding: out, as: UTF8.self)
    }
    static func decode(_ text: String) -> [UInt8] {
        var bits = 0, count = 0
        var out: [UInt8] = []
        for c in text.utf8 {
            let v: Int
            switch c {
            case UInt8(ascii: "-"): v = 62
            case UInt8(ascii: "_"): v = 63
            default:
                guard let k = table.firstIndex(of: c) else { continue }
                v = k
            }
            bits = bits << 6 | v
            count += 6
            if count >= 8 {
                count -= 8
                out.append(UInt8(bits >> count & 0xFF))
            }
        }
        return out
    }
}

extension String {
    func replacingOccurrences(_ a: String, _ b: String) -> String {
        var result = ""
        var rest = Substring(self)
        while let range = rest.range(of: a) {
            result += rest[..<range.lowerBound] + b
            rest = rest[range.upperBound...]
        }
        return result + rest
    }
}

/// gzip / zlib for the tests (compress-nio, as the engine decodes with).
enum Zlib {
    static func compress(_ bytes: [UInt8], gzip: Bool) throws -> [UInt8] {
        var input = ByteBuffer(bytes: bytes)
        let output = try input.compress(with: gzip ? .gzip() : .zlib())
        return Array(output.readableBytesView)
    }
}
