import KeyholeNetfilter
import KeyholePolicy
import Testing

/// DNS over TCP: only whole messages at message boundaries of the resolver's stream are read,
/// however the guest made the resolver segment its answer.
@Suite("DNS messages in TCP streams")
struct TCPDNSStreamsTests {
    let resolver = IPAddress("198.51.100.53")!
    let guest = IPAddress("10.0.2.2")!

    /// An IPv4 + TCP packet from the resolver's port 53 to the guest's port 40000.
    func packet(sequence: UInt32, flags: UInt8 = 0x18, data: [UInt8] = []) -> [UInt8] {
        let total = 40 + data.count
        var ip: [UInt8] = [0x45, 0, UInt8(total >> 8), UInt8(total & 0xFF), 0, 0, 0x40, 0, 64, 6, 0, 0]
        ip += resolver.bytes + guest.bytes
        let seq = [UInt8(sequence >> 24), UInt8(sequence >> 16 & 0xFF), UInt8(sequence >> 8 & 0xFF), UInt8(sequence & 0xFF)]
        let tcp: [UInt8] = [0, 53, 0x9C, 0x40] + seq + [0, 0, 0, 0, 0x50, flags, 0xFF, 0xFF, 0, 0, 0, 0]
        return ip + tcp + data
    }

    func framed(_ message: [UInt8]) -> [UInt8] { [UInt8(message.count >> 8), UInt8(message.count & 0xFF)] + message }

    func answer(_ name: String, _ address: [UInt8]) -> [UInt8] {
        var dns = ResponseBuilder(question: name)
        dns.answer(owner: ResponseBuilder.questionPointer, type: 1, ttl: 60, data: address)
        return dns.bytes
    }

    func read(_ streams: inout TCPDNSStreams, _ bytes: [UInt8]) throws -> [UInt8]? {
        try streams.message(in: DNSPacket.dnsPayload(bytes)).map(Array.init)
    }

    @Test func wholeMessagesAtBoundariesAreRead() throws {
        var streams = TCPDNSStreams()
        let first = framed(answer("api.example.test", [203, 0, 113, 10]))
        let second = framed(answer("other.example.test", [203, 0, 113, 11]))
        #expect(try read(&streams, packet(sequence: 999, flags: 0x12)) == nil, "the SYN-ACK sets the first boundary")
        #expect(try read(&streams, packet(sequence: 1000, data: first)) == Array(first.dropFirst(2)))
        // A retransmission of the first one is not at the boundary any more.
        #expect(try read(&streams, packet(sequence: 1000, data: first)) == nil)
        let boundary = 1000 + UInt32(first.count)
        #expect(try read(&streams, packet(sequence: boundary, data: second)) == Array(second.dropFirst(2)))
        #expect(try read(&streams, packet(sequence: boundary + UInt32(second.count), flags: 0x11)) == nil)
        #expect(streams.count == 0, "FIN forgets the stream")
    }

    @Test func aForgedMessageCutOutOfAnAnswerIsNotRead() throws {
        // The attacker's TXT record holds `00 30` + a forged answer; the guest shrank its MSS
        // so that one segment starts exactly there and looks like a whole message.
        var streams = TCPDNSStreams()
        let forged = framed(answer("api.example.test", [203, 0, 113, 66]))
        let prefix = [UInt8](repeating: 0x41, count: 70)
        let real = framed(prefix + forged)
        _ = try read(&streams, packet(sequence: 4_294_967_200, flags: 0x12))  // wraps around
        let start: UInt32 = 4_294_967_201
        #expect(try read(&streams, packet(sequence: start, data: Array(real.prefix(72)))) == nil, "a partial message is not read")
        #expect(try read(&streams, packet(sequence: start &+ 72, data: forged)) == nil)
        // The stream is no longer read at all (its answers pass, pinning nothing).
        #expect(try read(&streams, packet(sequence: start &+ UInt32(real.count), data: forged)) == nil)
    }

    @Test func withoutTheHandshakeNothingIsRead() throws {
        var streams = TCPDNSStreams()
        let message = framed(answer("api.example.test", [203, 0, 113, 10]))
        #expect(try read(&streams, packet(sequence: 1, data: message)) == nil)
    }

    @Test func theTableIsBounded() throws {
        var streams = TCPDNSStreams(capacity: 8)
        for k in 0..<100 {
            var bytes = packet(sequence: UInt32(k), flags: 0x12)
            bytes[22] = UInt8(k)  // destination port: another stream each time
            _ = try read(&streams, bytes)
        }
        #expect(streams.count == 8)
    }

    @Test func udpMessagesAreReadWhole() throws {
        var streams = TCPDNSStreams()
        let dns = answer("api.example.test", [203, 0, 113, 10])
        let udp: [UInt8] = [0, 53, 0x9C, 0x40, UInt8((8 + dns.count) >> 8), UInt8((8 + dns.count) & 0xFF), 0, 0]
        let total = 20 + udp.count + dns.count
        let ip: [UInt8] = [0x45, 0, UInt8(total >> 8), UInt8(total & 0xFF), 0, 0, 0x40, 0, 64, 17, 0, 0] + resolver.bytes + guest.bytes
        #expect(try read(&streams, ip + udp + dns) == dns)
        #expect(try DNSPacket.dnsPayload(ip + udp + dns).source == resolver)
    }
}
