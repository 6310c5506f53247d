import KeyholeNetfilter
import KeyholePolicy
import Testing

/// Builds DNS responses byte by byte, as a resolver would put them on the wire.
struct ResponseBuilder {
    var bytes: [UInt8] = []
    var answerCount: UInt16 = 0

    init(id: UInt16 = 0x1234, question: String, isResponse: Bool = true) {
        bytes = [UInt8(id >> 8), UInt8(id & 0xFF), isResponse ? 0x81 : 0x01, 0x80, 0, 1, 0, 0, 0, 0, 0, 0]
        bytes += Self.name(question)
        bytes += [0, 1, 0, 1]
    }

    static func name(_ name: String) -> [UInt8] {
        var out: [UInt8] = []
        for label in name.split(separator: ".") {
            out.append(UInt8(label.utf8.count))
            out += Array(label.utf8)
        }
        return out + [0]
    }

    mutating func answer(owner: [UInt8], type: UInt16, ttl: UInt32, data: [UInt8]) {
        bytes += owner
        bytes += [UInt8(type >> 8), UInt8(type & 0xFF), 0, 1]
        bytes += [UInt8(ttl >> 24), UInt8(ttl >> 16 & 0xFF), UInt8(ttl >> 8 & 0xFF), UInt8(ttl & 0xFF)]
        bytes += [UInt8(data.count >> 8), UInt8(data.count & 0xFF)]
        bytes += data
        answerCount += 1
        bytes[6] = UInt8(answerCount >> 8)
        bytes[7] = UInt8(answerCount & 0xFF)
    }

    /// Pointer to the question name, which always starts at offset 12.
    static let questionPointer: [UInt8] = [0xC0, 0x0C]
}

@Suite("DNS answers")
struct DNSMessageTests {
    @Test func aRecordsOfTheQuestion() throws {
        var r = ResponseBuilder(question: "API.Example.com")
        r.answer(owner: ResponseBuilder.questionPointer, type: 1, ttl: 300, data: [203, 0, 113, 10])
        r.answer(owner: ResponseBuilder.questionPointer, type: 28, ttl: 60, data: IPAddress("2001:db8::10")!.bytes)
        let result = try DNSMessage.parseResponse(r.bytes)
        #expect(result.transactionID == 0x1234)
        #expect(result.queriedName == "api.example.com")
        #expect(result.addresses.map(\.address.description) == ["203.0.113.10", "2001:db8::10"])
        #expect(result.addresses.map(\.ttl) == [300, 60])
    }

    @Test func cnameChainTakesTheSmallestTTL() throws {
        var r = ResponseBuilder(question: "www.example.com")
        r.answer(owner: ResponseBuilder.questionPointer, type: 5, ttl: 30, data: ResponseBuilder.name("edge.cdn.example.net"))
        r.answer(owner: ResponseBuilder.name("edge.cdn.example.net"), type: 5, ttl: 600, data: ResponseBuilder.name("x.cdn.example.net"))
        r.answer(owner: ResponseBuilder.name("x.cdn.example.net"), type: 1, ttl: 3600, data: [198, 51, 100, 7])
        // An answer for a name outside the chain must not be attributed to the question.
        r.answer(owner: ResponseBuilder.name("unrelated.example.org"), type: 1, ttl: 3600, data: [10, 0, 0, 1])
        let result = try DNSMessage.parseResponse(r.bytes)
        #expect(result.chain == ["edge.cdn.example.net", "x.cdn.example.net"])
        #expect(result.addresses == [.init(address: IPAddress("198.51.100.7")!, ttl: 30)])
    }

    @Test func malformedPacketsThrowInsteadOfCrashing() throws {
        var r = ResponseBuilder(question: "a.example.com")
        r.answer(owner: ResponseBuilder.questionPointer, type: 1, ttl: 1, data: [1, 2, 3, 4])
        let whole = r.bytes
        for length in 0..<whole.count {
            #expect(throws: DNSParseError.self) { try DNSMessage.parseResponse(Array(whole.prefix(length))) }
        }
        #expect(throws: DNSParseError.notAResponse) {
            try DNSMessage.parseResponse(ResponseBuilder(question: "a.example.com", isResponse: false).bytes)
        }
        // A compression pointer that points at itself.
        var loop = ResponseBuilder(question: "a.example.com")
        loop.answer(owner: [0xC0, UInt8(loop.bytes.count)], type: 1, ttl: 1, data: [1, 2, 3, 4])
        #expect(throws: DNSParseError.compressionLoop) { try DNSMessage.parseResponse(loop.bytes) }
    }
}

/// The queries Keyhole itself sends (for a guest's CONNECT host): recursive, one question.
@Suite("DNS queries")
struct DNSQueryTests {
    @Test func aQueryIsWhatAResolverExpects() throws {
        let query = try #require(DNSMessage.query(id: 0xBEEF, name: "api.example.test", ipv6: true))
        #expect(Array(query.prefix(12)) == [0xBE, 0xEF, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0])
        #expect(Array(query.dropFirst(12)) == ResponseBuilder.name("api.example.test") + [0, 28, 0, 1])
        #expect(DNSMessage.query(id: 1, name: "a.example", ipv6: false)?.suffix(4) == [0, 1, 0, 1])
        // Not names: nothing is sent.
        for bad in ["", "a..example", String(repeating: "a", count: 64) + ".example", String(repeating: "a.", count: 130)] {
            #expect(DNSMessage.query(id: 1, name: bad, ipv6: false) == nil, "\(bad)")
        }
        // A response to it parses back to the question.
        var response = ResponseBuilder(id: 0xBEEF, question: "api.example.test")
        response.answer(owner: ResponseBuilder.name("api.example.test"), type: 1, ttl: 60, data: [203, 0, 113, 10])
        let parsed = try DNSMessage.parseResponse(response.bytes)
        #expect(parsed.transactionID == 0xBEEF && parsed.queriedName == "api.example.test")
    }
}
