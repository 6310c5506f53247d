import Foundation
import Testing

@testable import KeyholeProxy

@Suite("Audit records")
struct AuditRecordTests {
    @Test func oneJSONObjectPerLineWithAnRFC3339Time() throws {
        let record = AuditRecord(
            level: .warn, event: "violation", sandbox: "w", connection: 42, secret: "TOKEN", reason: "host-not-allowed",
            host: "evil.example", path: "/a\"b\\c\u{1}d\u{7F}é")
        let time = Date(timeIntervalSince1970: 1_795_000_000.1234)
        let line = record.jsonLine(time: time)
        #expect(line.hasSuffix("}") && !line.contains("\n"))
        #expect(line.hasPrefix("{\"time\":\"2026-11-18T11:06:40.123Z\""))
        let object = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
        #expect(object["time"] as? String == ISO8601DateFormatter.string(from: time, timeZone: .gmt, formatOptions: [.withInternetDateTime, .withFractionalSeconds]))
        #expect(object["connection"] as? Int == 42)
        #expect(object["level"] as? String == "warn")
        #expect(object["path"] as? String == "/a\"b\\c\u{1}d\u{7F}é")
        #expect(object["site"] == nil)
        #expect(line.contains("\\u0001") && line.contains("\\u007f"))
    }

    @Test func timestampsKeepMillisecondsAndPadFields() {
        #expect(AuditRecord.timestamp(Date(timeIntervalSince1970: 0)) == "1970-01-01T00:00:00.000Z")
        #expect(AuditRecord.timestamp(Date(timeIntervalSince1970: 1_000_000_000.999)) == "2001-09-09T01:46:40.999Z")
    }
}
