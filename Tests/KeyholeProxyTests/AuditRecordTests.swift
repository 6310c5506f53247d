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

    @Test func aCachedSecondIsReusedOnlyWithinThatSecond() {
        // One cache across records, as the audit log keeps it: each line must still carry
        // its own second and milliseconds.
        var cache = AuditRecord.TimestampCache()
        let times = [1_795_000_000.1, 1_795_000_000.9, 1_795_000_001.0, 1_795_000_000.5, 1_795_003_600.25, -0.5]
        for t in times {
            var cached: [UInt8] = []
            AuditRecord.appendTimestamp(Date(timeIntervalSince1970: t), to: &cached, cache: &cache)
            let expected = "\"" + ISO8601DateFormatter.string(
                from: Date(timeIntervalSince1970: t), timeZone: .gmt, formatOptions: [.withInternetDateTime, .withFractionalSeconds]) + "\""
            #expect(String(decoding: cached, as: UTF8.self) == expected, "\(t)")
        }
    }

    @Test func connectionNumbersAreWrittenInDecimal() throws {
        for n: UInt64 in [0, 7, 9, 10, 99, 100, 4_294_967_296, UInt64.max] {
            let line = AuditRecord(level: .info, event: "e", sandbox: "s", connection: n).jsonLine()
            #expect(line.contains("\"connection\":\(n),"), "\(line)")
        }
    }
}

/// `AuditLog.write(info:)`: a record given as the bytes after its time (what a session keeps
/// of its last substitution) makes the line `write(_:)` makes of the record.
@Suite("Audit log, preformatted records")
struct AuditPreformattedTests {
    @Test func theBytesAfterTheTimeMakeTheSameLineAsTheRecord() throws {
        let path = NSTemporaryDirectory() + "keyhole-audit-\(getpid())-\(UInt64.random(in: 0...UInt64.max)).log"
        defer { unlink(path) }
        let log = try AuditLog(path: path)
        #expect(log.takesPreformatted)
        let records = [
            AuditRecord(
                level: .info, event: "substituted", sandbox: "s", connection: 9, secret: "TOKEN", site: "header",
                sni: "api.example.test", host: "api.example.test", destination: "203.0.113.10:443", method: "GET", path: "/a\"b\u{1}é"),
            AuditRecord(level: .info, event: "substituted", sandbox: "s", connection: 10, secret: "TOKEN", site: "query"),
        ]
        for record in records {
            log.write(record)
            var fields: [UInt8] = []
            record.appendFieldsAfterTime(to: &fields)
            log.write(info: fields)
        }
        log.flush()
        let lines = try String(contentsOfFile: path, encoding: .utf8).split(separator: "\n").map(String.init)
        try #require(lines.count == 4, "\(lines)")
        // The same but for the time (each line has its own).
        func afterTime(_ line: String) -> Substring { line[line.firstRange(of: "\"level\"")!.lowerBound...] }
        #expect(afterTime(lines[0]) == afterTime(lines[1]))
        #expect(afterTime(lines[2]) == afterTime(lines[3]))
        #expect(lines.allSatisfy { $0.hasPrefix("{\"time\":\"") })
        for line in lines { _ = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any], "\(line)") }
        // Observers are given records, so a log with one takes none preformatted.
        log.addObserver { _ in }
        #expect(!log.takesPreformatted)
    }
}

/// `--audit-log syslog`: one RFC 3164 datagram per record to the syslog socket.
@Suite("Audit log to syslog")
struct AuditSyslogTests {
    @Test func recordsGoToTheSyslogSocketWithTheirSeverity() throws {
        let path = NSTemporaryDirectory() + "keyhole-syslog-\(getpid()).sock"
        unlink(path)
        defer { unlink(path) }
        // The stand-in syslog daemon: a bound datagram socket.
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
        #expect(fd >= 0)
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in for (i, b) in path.utf8.enumerated() { raw[i] = b } }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        #expect(bound == 0)
        setenv("KEYHOLE_SYSLOG_SOCKET", path, 1)
        defer { unsetenv("KEYHOLE_SYSLOG_SOCKET") }
        let log = try AuditLog(path: "syslog")
        log.write(AuditRecord(level: .warn, event: "violation", sandbox: "s", connection: 7, secret: "TOKEN", reason: "host-not-allowed"))
        log.write(AuditRecord(level: .info, event: "substituted", sandbox: "s", connection: 8, secret: "TOKEN"))
        var received: [String] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        for _ in 0..<2 {
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n > 0 { received.append(String(decoding: buffer[0..<n], as: UTF8.self)) }
        }
        #expect(received.count == 2)
        // daemon facility (3): warning <28>, info <30>; the tag, then the JSON record.
        #expect(received.first?.hasPrefix("<28>keyhole[\(getpid())]: {\"time\":") == true, "\(received)")
        #expect(received.first?.contains("\"event\":\"violation\"") == true)
        #expect(received.last?.hasPrefix("<30>keyhole[") == true)
        #expect(received.allSatisfy { !$0.hasSuffix("\n") })
    }
}
