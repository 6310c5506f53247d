import KeyholeEngine
import KeyholePolicy
import NIOCore
import Testing

/// After a `101` for `websocket`, the guest's frames are unmasked and read (RFC 6455).
@Suite("WebSocket messages")
struct WebSocketTests {
    static let upgrade =
        "GET /socket HTTP/1.1\r\nHost: api.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        + "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        + "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n"

    let bodySecret = secret("TOKEN", value: "real-token-value", inject: Injection(headers: true, body: true))

    /// A client frame: masked with `key`.
    static func frame(_ payload: [UInt8], opcode: UInt8 = 1, fin: Bool = true, key: [UInt8] = [0x37, 0xFA, 0x21, 0x3D], masked: Bool = true, rsv: UInt8 = 0)
        -> [UInt8]
    {
        var bytes: [UInt8] = [(fin ? 0x80 : 0) | rsv | opcode]
        let mask: UInt8 = masked ? 0x80 : 0
        if payload.count < 126 {
            bytes.append(mask | UInt8(payload.count))
        } else if payload.count <= 0xFFFF {
            bytes += [mask | 126, UInt8(payload.count >> 8), UInt8(payload.count & 0xFF)]
        } else {
            bytes.append(mask | 127)
            for shift in stride(from: 56, through: 0, by: -8) { bytes.append(UInt8((payload.count >> shift) & 0xFF)) }
        }
        if !masked { return bytes + payload }
        return bytes + key + payload.enumerated().map { $0.element ^ key[$0.offset & 3] }
    }

    static func text(_ s: String, fin: Bool = true, opcode: UInt8 = 1) -> [UInt8] { frame(Array(s.utf8), opcode: opcode, fin: fin) }

    /// Parses client frames back: (opcode, fin, unmasked payload).
    static func frames(_ bytes: [UInt8]) -> [(UInt8, Bool, String)] {
        var result: [(UInt8, Bool, String)] = []
        var i = 0
        while i + 2 <= bytes.count {
            let fin = bytes[i] & 0x80 != 0, opcode = bytes[i] & 0x0F
            var length = Int(bytes[i + 1] & 0x7F)
            var k = i + 2
            if length == 126 { length = Int(bytes[k]) << 8 | Int(bytes[k + 1]); k += 2 } else if length == 127 {
                length = 0
                for j in 0..<8 { length = length << 8 | Int(bytes[k + j]) }
                k += 8
            }
            let key = Array(bytes[k..<k + 4])
            k += 4
            let plain = bytes[k..<k + length].enumerated().map { $0.element ^ key[$0.offset & 3] }
            result.append((opcode, fin, String(decoding: plain, as: UTF8.self)))
            i = k + length
        }
        return result
    }

    struct Outcome {
        var head: String
        var frames: [UInt8]
        var events: [RewriteEvent]
        var violations: [Violation] { events.compactMap { if case .violation(let v) = $0 { return v } else { return nil } } }
        var framingErrors: [FramingError] { events.compactMap { if case .framingError(let e, _) = $0 { return e } else { return nil } } }
    }

    func run(
        _ frames: [UInt8], secrets: [Secret]? = nil, identity: ConnectionIdentity = .verifiedTLS(sni: "api.example.com"), chunk: Int? = nil,
        finish: Bool = true, budget: HeldBodyBudget? = nil
    ) -> Outcome {
        let rewriter = RequestRewriter(identity: identity, secrets: secrets ?? [bodySecret], heldBodyBudget: budget)
        var output = RewriteOutput()
        var bytes: [UInt8] = []
        var events: [RewriteEvent] = []
        func collect() {
            for piece in output.upstream { bytes += piece.readableBytesView }
            output.upstream.removeAll()
            events += output.events
            output.events.removeAll()
        }
        rewriter.consume(ByteBuffer(string: Self.upgrade), into: &output)
        collect()
        let head = String(decoding: bytes, as: UTF8.self)
        bytes = []
        rewriter.upgradeAccepted(websocket: true, into: &output)
        collect()
        let size = max(1, chunk ?? frames.count)
        var offset = 0
        while offset < frames.count {
            rewriter.consume(ByteBuffer(bytes: frames[offset..<min(frames.count, offset + size)]), into: &output)
            collect()
            offset += size
        }
        if finish {
            rewriter.finish(into: &output)
            collect()
        }
        return Outcome(head: head, frames: bytes, events: events)
    }

    @Test func theOfferCarriesNoExtensionKeyholeCannotRead() {
        let outcome = run([])
        #expect(!outcome.head.lowercased().contains("sec-websocket-extensions"))
        #expect(outcome.head.contains("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"))
    }

    @Test func aPlaceholderInATextMessageIsSubstitutedHoweverTheFramesAreSplit() {
        let input = Self.text("{\"token\":\"$MSB_TOKEN\",\"n\":1}") + Self.text("second")
        for chunk in [nil, 1, 3, 7] as [Int?] {
            let outcome = run(input, chunk: chunk)
            let frames = Self.frames(outcome.frames)
            #expect(frames.map(\.2) == ["{\"token\":\"real-token-value\",\"n\":1}", "second"], "chunk \(chunk ?? 0)")
            #expect(outcome.violations.isEmpty)
            #expect(outcome.events.contains { if case .substituted("TOKEN", .websocket, _) = $0 { return true } else { return false } })
        }
    }

    @Test func framesWithoutPlaceholdersPassByteIdentical() {
        let input = Self.text("hello") + Self.frame([0, 1, 2, 255], opcode: 2) + Self.frame(Array("ping".utf8), opcode: 9)
            + Self.text("frag-", fin: false) + Self.frame(Array("ment".utf8), opcode: 0)
        for chunk in [nil, 2] as [Int?] {
            #expect(run(input, chunk: chunk).frames == input)
        }
    }

    @Test func aLongMessageGetsTheRightLengthEncoding() {
        let filler = String(repeating: "x", count: 70_000)
        let outcome = run(Self.text(filler + "$MSB_TOKEN"), chunk: 4096)
        let frames = Self.frames(outcome.frames)
        #expect(frames.count == 1 && frames[0].2 == filler + "real-token-value")
        #expect(outcome.frames[1] == 0x80 | 127, "64-bit length")
    }

    @Test func whereItMayNotBeSubstitutedItIsAViolation() {
        let message = Self.text("token=$MSB_TOKEN")
        // inject.body off
        let off = run(message, secrets: [secret("TOKEN", value: "v")])
        #expect(off.violations.first?.reason == .injectionDisabled)
        #expect(off.frames.isEmpty)
        // to a host the secret is not allowed for
        let elsewhere = run(message, secrets: [secret("TOKEN", value: "v", hosts: ["other.example.com"], inject: Injection(body: true))])
        #expect(elsewhere.violations.first?.reason == .hostNotAllowed)
        #expect(elsewhere.frames.isEmpty)
        // in a binary message, a ping, or split across the frames of a message
        #expect(run(Self.frame(Array("$MSB_TOKEN".utf8), opcode: 2)).violations.first?.reason == .binaryOrLargeMessage)
        #expect(run(Self.frame(Array("$MSB_TOKEN".utf8), opcode: 9)).violations.first?.reason == .neverSubstituted)
        let split = run(Self.text("a $MSB_TO", fin: false) + Self.text("KEN b", opcode: 0))
        #expect(split.violations.first?.reason == .splitAcrossFrames)
        #expect(split.frames.isEmpty, "nothing of the message went upstream")
        // JSON-escaped: not substituted, refused
        #expect(run(Self.text("\\u0024MSB_TOKEN")).violations.first?.reason == .encodedForm)
    }

    @Test func aFragmentedMessageIsSubstitutedWithinAFrameAndControlFramesKeepTheirPlace() {
        let input = Self.text("part one ", fin: false) + Self.frame(Array("ping".utf8), opcode: 9) + Self.text("$MSB_TOKEN end", opcode: 0)
        let frames = Self.frames(run(input, chunk: 5).frames)
        #expect(frames.map(\.0) == [1, 9, 0])
        #expect(frames.map(\.2) == ["part one ", "ping", "real-token-value end"])
    }

    @Test func aMessageTooLargeToHoldIsStreamedAndOnlyScanned() {
        let big = [UInt8](repeating: 0x61, count: (1 << 20) + 10)
        let clean = Self.frame(big, fin: false) + Self.frame(Array("tail".utf8), opcode: 0)
        #expect(run(clean, chunk: 65536).frames == clean)
        let dirty = Self.frame(big, fin: false) + Self.frame(Array("$MSB_TOKEN".utf8), opcode: 0)
        let outcome = run(dirty, chunk: 65536)
        #expect(outcome.violations.first?.reason == .binaryOrLargeMessage)
        #expect(!String(decoding: outcome.frames, as: UTF8.self).contains("real-token-value"))
    }

    @Test func framesThatBreakTheProtocolResetTheConnection() {
        #expect(run(Self.frame(Array("hi".utf8), masked: false)).framingErrors == [.websocketProtocol], "client frames are masked")
        #expect(run(Self.frame(Array("hi".utf8), rsv: 0x40)).framingErrors == [.websocketProtocol], "no extension was offered")
        #expect(run(Self.frame(Array("hi".utf8), opcode: 0)).framingErrors == [.websocketProtocol], "a continuation needs a message")
        #expect(run(Self.frame(Array("hi".utf8), opcode: 3)).framingErrors == [.websocketProtocol], "reserved opcode")
        #expect(run(Self.frame([UInt8](repeating: 1, count: 126), opcode: 9)).framingErrors == [.websocketProtocol], "long ping")
    }

    // MARK: bounds (what a hostile guest sends after the 101)

    /// The header of a frame whose payload has not arrived yet.
    static func header(length: Int, opcode: UInt8 = 1, fin: Bool = true, key: [UInt8] = [0x37, 0xFA, 0x21, 0x3D]) -> [UInt8] {
        var bytes: [UInt8] = [(fin ? 0x80 : 0) | opcode]
        if length < 126 {
            bytes.append(0x80 | UInt8(length))
        } else if length <= 0xFFFF {
            bytes += [0x80 | 126, UInt8(length >> 8), UInt8(length & 0xFF)]
        } else {
            bytes.append(0x80 | 127)
            for shift in stride(from: 56, through: 0, by: -8) { bytes.append(UInt8((length >> shift) & 0xFF)) }
        }
        return bytes + key
    }

    /// Masks `plain` as the payload bytes at `offset` of a frame with `key`.
    static func masked(_ plain: [UInt8], offset: Int = 0, key: [UInt8] = [0x37, 0xFA, 0x21, 0x3D]) -> [UInt8] {
        plain.enumerated().map { $0.element ^ key[($0.offset + offset) & 3] }
    }

    /// Feeds pieces one by one, returning what went upstream after each.
    func feed(_ pieces: [[UInt8]], budget: HeldBodyBudget? = nil) -> (after: [[UInt8]], events: [RewriteEvent], rewriter: RequestRewriter) {
        let rewriter = RequestRewriter(identity: .verifiedTLS(sni: "api.example.com"), secrets: [bodySecret], heldBodyBudget: budget)
        var output = RewriteOutput()
        rewriter.consume(ByteBuffer(string: Self.upgrade), into: &output)
        rewriter.upgradeAccepted(websocket: true, into: &output)
        output = RewriteOutput()
        var after: [[UInt8]] = []
        var events: [RewriteEvent] = []
        for piece in pieces {
            rewriter.consume(ByteBuffer(bytes: piece), into: &output)
            after.append(output.upstream.flatMap { Array($0.readableBytesView) })
            events += output.events
            output = RewriteOutput()
        }
        return (after, events, rewriter)
    }

    @Test func aHugeDeclaredFrameIsStreamedFromItsHeaderNotHeld() {
        // 1 GiB declared; 3 MiB sent: it goes on as it comes (minus a placeholder's lookahead).
        let piece = Self.masked([UInt8](repeating: 0x61, count: 1 << 20))  // 1 MiB: a multiple of 4, so the key phase repeats
        let fed = feed([Self.header(length: 1 << 30, fin: true), piece, piece, piece])
        let forwarded = fed.after.reduce(0) { $0 + $1.count }
        #expect(forwarded >= 14 + 3 * (1 << 20) - 64, "forwarded \(forwarded)")
        #expect(fed.events.isEmpty)
    }

    @Test func controlAndEmptyFramesCountTowardTheHold() {
        // A message opened, then endless empty continuations and pings: each costs its header,
        // and past the frame cap the message streams: they go on instead of piling up.
        var pieces: [[UInt8]] = [Self.text("open", fin: false)]
        for i in 0..<5000 { pieces.append(i % 2 == 0 ? Self.frame([], opcode: 0, fin: false) : Self.frame([], opcode: 9)) }
        let fed = feed(pieces)
        let forwarded = fed.after.reduce(0) { $0 + $1.count }
        #expect(forwarded >= 5000 * 6 - WebSocketTests.maxHeldFrames * 6, "forwarded \(forwarded)")
        #expect(fed.events.isEmpty)
    }
    static let maxHeldFrames = 1024

    @Test func manyFramesAndManyPlaceholdersStayCorrect() {
        // Many small frames, a placeholder in each: substituted frame by frame.
        var input: [UInt8] = Self.text("$MSB_TOKEN", fin: false)
        for _ in 0..<900 { input += Self.frame(Array("$MSB_TOKEN".utf8), opcode: 0, fin: false) }
        input += Self.frame(Array("$MSB_TOKEN".utf8), opcode: 0)
        let outcome = run(input)
        #expect(outcome.violations.isEmpty)
        let frames = Self.frames(outcome.frames)
        #expect(frames.count == 902 && frames.allSatisfy { $0.2 == "real-token-value" })
        // Past the frame cap the message streams, and a placeholder in it is refused.
        var many: [UInt8] = Self.text("x", fin: false)
        for _ in 0..<2000 { many += Self.frame([], opcode: 0, fin: false) }
        many += Self.frame(Array("$MSB_TOKEN".utf8), opcode: 0)
        #expect(run(many).violations.first?.reason == .binaryOrLargeMessage)
    }

    @Test func aHeldMessageTakesFromTheProcessBudget() {
        let budget = HeldBodyBudget(limit: 1000)
        // Held within the budget: substituted, and given back.
        let small = run(Self.text("$MSB_TOKEN"), budget: budget)
        #expect(small.violations.isEmpty && Self.frames(small.frames).first?.2 == "real-token-value")
        #expect(budget.inUse == 0)
        // Over the budget: streamed (placeholder-free messages still pass, byte-identical).
        let big = Self.text(String(repeating: "y", count: 2000))
        #expect(run(big, budget: budget).frames == big)
        #expect(budget.inUse == 0)
        // What a connection holds is taken while it holds it.
        let fed = feed([Self.text(String(repeating: "z", count: 400), fin: false)], budget: budget)
        #expect(budget.inUse > 0)
        withExtendedLifetime(fed.rewriter) {}
        _ = fed
    }

    @Test func aPlaceholderSplitAcrossFramesOfAnUnfinishedMessageIsRefusedWhenTheGuestCloses() {
        let outcome = run(Self.text("a $MSB_TO", fin: false) + Self.text("KEN b", fin: false, opcode: 0))
        #expect(outcome.violations.first?.reason == .splitAcrossFrames)
        #expect(outcome.frames.isEmpty)
        // And a clean unfinished message goes on as sent.
        let clean = Self.text("a ", fin: false) + Self.text("b", fin: false, opcode: 0)
        #expect(run(clean).frames == clean)
    }

    @Test func aStreamedMessageHoldsBackWhatMayBeginAPlaceholder() {
        // A large frame whose first read ends inside a placeholder: the start of it is not
        // forwarded before the rest decides it.
        let before = [UInt8](repeating: 0x61, count: 3 << 20)
        let plain = before + Array("$MSB_TOKEN and more".utf8)
        let masked = Self.masked(plain)
        let cut = before.count + 7  // "$MSB_TO"
        let fed = feed([Self.header(length: plain.count), Array(masked[..<cut]), Array(masked[cut...])])
        let firstRead = fed.after[0] + fed.after[1]
        let forwardedPlain = Self.masked(Array(firstRead.dropFirst(14)))
        #expect(forwardedPlain.count >= before.count - 64, "the frame streams as it comes")
        #expect(!forwardedPlain.contains(0x24), "no byte of the placeholder went upstream")
        #expect(fed.events.contains { if case .violation = $0 { return true } else { return false } })
        #expect(fed.after[2].isEmpty)
    }
}
