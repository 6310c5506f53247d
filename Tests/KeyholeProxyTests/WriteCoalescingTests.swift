import NIOCore
import NIOEmbedded
import Testing

@testable import KeyholeProxy

/// Small pieces are joined into one write (one TLS record), in a buffer the session reuses
/// for its next join. A join still held by the channel (a socket that could not take it
/// yet) must never be overwritten by the next one.
@Suite("Write coalescing")
struct WriteCoalescingTests {
    func pieces(_ texts: [String]) -> [ByteBuffer] { texts.map { ByteBuffer(string: $0) } }

    @Test func smallPiecesGoOutAsOneWriteAndTheBufferIsKeptForTheNext() throws {
        let channel = EmbeddedChannel()
        var scratch: ByteBuffer?
        let total = Session.writeCoalesced(pieces(["GET / HTTP/1.1\r\n", "Authorization: Bearer ", "real", "\r\n\r\n"]), to: channel, reusing: &scratch)
        #expect(total == 46)
        #expect(try channel.readOutbound(as: ByteBuffer.self).map { String(buffer: $0) } == "GET / HTTP/1.1\r\nAuthorization: Bearer real\r\n\r\n")
        #expect(try channel.readOutbound(as: ByteBuffer.self) == nil)
        #expect(scratch != nil)
        // One piece needs no join (and leaves the kept buffer alone).
        _ = Session.writeCoalesced(pieces(["whole"]), to: channel, reusing: &scratch)
        #expect(try channel.readOutbound(as: ByteBuffer.self).map { String(buffer: $0) } == "whole")
        #expect(scratch != nil)
        _ = try channel.finish()
    }

    @Test func aJoinStillHeldByTheChannelIsNotOverwrittenByTheNext() throws {
        // EmbeddedChannel keeps every write until it is read: the first join is still
        // referenced when the second one reuses the kept buffer.
        let channel = EmbeddedChannel()
        var scratch: ByteBuffer?
        _ = Session.writeCoalesced(pieces(["first ", "request ", "head"]), to: channel, reusing: &scratch)
        _ = Session.writeCoalesced(pieces(["SECOND", "!"]), to: channel, reusing: &scratch)
        _ = Session.writeCoalesced(pieces(["third ", "one"]), to: channel, reusing: &scratch)
        let written = try [0, 1, 2].map { _ in try channel.readOutbound(as: ByteBuffer.self).map { String(buffer: $0) } }
        #expect(written == ["first request head", "SECOND!", "third one"])
        _ = try channel.finish()
    }

    @Test func largePiecesAreNotCopiedAndLargeJoinsAreNotKept() throws {
        let channel = EmbeddedChannel()
        var scratch: ByteBuffer?
        let big = String(repeating: "b", count: Session.coalesceLimit)
        _ = Session.writeCoalesced(pieces(["head", big, "tail"]), to: channel, reusing: &scratch)
        let written = try [0, 1, 2].map { _ in try channel.readOutbound(as: ByteBuffer.self).map { String(buffer: $0) } }
        #expect(written == ["head", big, "tail"])
        // A join larger than the keep limit is not held on to (an idle connection holds little).
        scratch = nil
        let halves = String(repeating: "h", count: Session.joinKeepLimit)
        _ = Session.writeCoalesced(pieces([halves, halves]), to: channel, reusing: &scratch)
        #expect(try channel.readOutbound(as: ByteBuffer.self)?.readableBytes == 2 * Session.joinKeepLimit)
        #expect(scratch == nil)
        _ = try channel.finish()
    }
}
