import CKeyholeSIMD
import KeyholePolicy

/// A parsed HTTP/1.x request head: offsets into the header block, nothing copied.
struct RequestHead {
    struct Field {
        /// The whole line including its CRLF.
        var line: Range<Int>
        var name: Range<Int>
        /// The value without surrounding whitespace.
        var value: Range<Int>
        var kind: FieldKind
    }

    enum FieldKind {
        case other, host, contentLength, transferEncoding, authorization, upgrade, expect, contentEncoding, contentType, acceptEncoding
        case connection
    }

    static let maxLines = 1024
    static let typicalLines = 64
    /// Offsets of each line's LF, reused between requests.
    var lineEnds: [UInt32] = []

    var method: Range<Int> = 0..<0
    var target: Range<Int> = 0..<0
    /// The path part of the target (for absolute-form, after the authority).
    var path: Range<Int> = 0..<0
    /// The query after `?`, without the `?`.
    var query: Range<Int>?
    /// The authority of an absolute-form (`http://host/…`) or authority-form target.
    var authority: Range<Int>?
    var minorVersion = 1
    var fields: [Field] = []
    var length = 0

    var hostField: Int?
    var hostCount = 0
    /// The host part of the one `Host` value (brackets and port removed), set by `parse`.
    var host: Range<Int> = 0..<0
    /// The host part of `authority`, when there is one.
    var authorityHost: Range<Int>?
    /// Why the Host (or the authority) is not acceptable, or nil.
    var hostProblem: FramingError?
    var contentLength: Int?
    var chunked = false
    var upgrade = false
    var isConnect = false
    var expectContinueField: Int?
    var contentEncoded = false
    var formBody = false
    /// A `Connection` field names the `close` option (RFC 9112 §9.6).
    var closeRequested = false

    /// RFC 9110 tchar, as two 128-bit masks (no table lookups through a lazy global).
    @inline(__always)
    static func isToken(_ b: UInt8) -> Bool {
        // Bits set for: ! # $ % & ' * + - . 0-9 (0x21–0x3F range) ...
        let low: UInt64 = 0x03FF_6CFA_0000_0000  // ! # $ % & ' * + - . 0-9
        let high: UInt64 = 0x57FF_FFFF_C7FF_FFFE  // A-Z ^ _ ` a-z | ~
        if b < 64 { return (low >> UInt64(b)) & 1 == 1 }
        if b < 128 { return (high >> UInt64(b - 64)) & 1 == 1 }
        return false
    }

    enum LineScan: Equatable {
        case incomplete
        /// The head is complete and this long (through its empty line).
        case complete(Int)
        case error(FramingError)
    }

    /// Lines found by the last `scanLines`.
    var lineCount = 0

    /// One SIMD pass that finds where the head ends, splits it into lines and validates
    /// every control byte (bare CR/LF, NUL, other controls) on the way.
    mutating func scanLines(_ b: UnsafeRawBufferPointer) -> LineScan {
        guard b.count > 0 else { return .incomplete }
        // Room for the lines of a typical head; a longer one gets the full table (kept per
        // connection: a small one keeps an idle connection small).
        if lineEnds.isEmpty { lineEnds = [UInt32](repeating: 0, count: Self.typicalLines) }
        var offending = 0
        func scan() -> Int {
            lineEnds.withUnsafeMutableBufferPointer { ends in
                keyhole_head_lines(b.baseAddress!.assumingMemoryBound(to: UInt8.self), b.count, ends.baseAddress!, ends.count, &offending)
            }
        }
        var result = scan()
        if result == -5, lineEnds.count < Self.maxLines {
            lineEnds = [UInt32](repeating: 0, count: Self.maxLines)
            result = scan()
        }
        switch result {
        case -1: return .error(.bareLF)
        case -2: return .error(.bareCR)
        case -3: return .error(.nulByte)
        case -4: return .error(.controlCharacter)
        case -5: return .error(.tooManyHeaderFields)
        case -6: return .incomplete
        default:
            lineCount = result
            return .complete(Int(lineEnds[result - 1]) + 1)
        }
    }

    /// Parses the head found by `scanLines` (`b` starts where the scanned bytes started).
    /// `fields` keeps its capacity between requests of one connection.
    mutating func parse(_ b: UnsafeRawBufferPointer) throws(FramingError) {
        fields.removeAll(keepingCapacity: true)
        hostField = nil
        hostCount = 0
        contentLength = nil
        chunked = false
        upgrade = false
        isConnect = false
        expectContinueField = nil
        contentEncoded = false
        formBody = false
        closeRequested = false
        query = nil
        authority = nil
        length = b.count

        var sawTransferEncoding = false
        var lineStart = 0
        guard lineCount >= 2 else { throw .malformedRequestLine }
        for index in 0..<(lineCount - 1) {  // the last line is the empty one
            let lf = Int(lineEnds[index])
            let contentEnd = lf - 1  // the CR
            if index == 0 {
                try parseRequestLine(b, lineStart..<contentEnd)
            } else {
                try parseField(b, line: lineStart..<(lf + 1), content: lineStart..<contentEnd, sawTransferEncoding: &sawTransferEncoding)
            }
            lineStart = lf + 1
        }
        if chunked && contentLength != nil { throw .contentLengthWithTransferEncoding }
        if sawTransferEncoding && minorVersion == 0 { throw .transferEncodingInHTTP10 }
        checkHost(b)
    }

    /// Exactly one Host, and a plain authority: servers route anything else in their own
    /// way (nginx sends `Host: [name]` to its default server), so Keyhole refuses it. Not
    /// thrown: the rewriter first looks for placeholders (a request that carries one is a
    /// violation, whatever else is wrong with it), then refuses the request.
    private mutating func checkHost(_ b: UnsafeRawBufferPointer) {
        host = 0..<0
        authorityHost = nil
        guard hostCount == 1, let hostField else {
            hostProblem = hostCount == 0 ? .missingHost : .duplicateHost
            return
        }
        guard let host = Self.hostPart(b, fields[hostField].value) else {
            hostProblem = .invalidHost
            return
        }
        self.host = host
        if let authority {
            guard let authorityHost = Self.hostPart(b, authority) else {
                hostProblem = .invalidHost
                return
            }
            self.authorityHost = authorityHost
        }
        hostProblem = nil
    }

    private mutating func parseRequestLine(_ b: UnsafeRawBufferPointer, _ line: Range<Int>) throws(FramingError) {
        var i = line.lowerBound
        while i < line.upperBound, Self.isToken(b[i]) { i += 1 }
        guard i > line.lowerBound, i < line.upperBound, b[i] == 0x20 else { throw .malformedRequestLine }
        method = line.lowerBound..<i
        i += 1
        let targetStart = i
        let p = b.baseAddress!.assumingMemoryBound(to: UInt8.self)
        i = targetStart + keyhole_find_nonvisible(p + targetStart, line.upperBound - targetStart)
        guard i > targetStart, i < line.upperBound, b[i] == 0x20 else { throw .malformedRequestLine }
        target = targetStart..<i
        i += 1
        // "HTTP/1.0" or "HTTP/1.1", exactly.
        guard line.upperBound - i == 8 else { throw .malformedRequestLine }
        let version: [UInt8] = [0x48, 0x54, 0x54, 0x50, 0x2F, 0x31, 0x2E]
        for k in 0..<7 where b[i + k] != version[k] {
            throw k < 5 ? .malformedRequestLine : .unsupportedHTTPVersion
        }
        switch b[i + 7] {
        case 0x30: minorVersion = 0
        case 0x31: minorVersion = 1
        default: throw .unsupportedHTTPVersion
        }
        isConnect = method.count == 7 && Self.equalsIgnoringCase(b, method, "connect")
        splitTarget(b)
    }

    private mutating func splitTarget(_ b: UnsafeRawBufferPointer) {
        var pathStart = target.lowerBound
        if isConnect {
            authority = target
            path = target.upperBound..<target.upperBound
            return
        }
        if b[target.lowerBound] != 0x2F && b[target.lowerBound] != 0x2A {  // not "/" or "*"
            // absolute-form: scheme "://" authority path
            var i = target.lowerBound
            while i + 2 < target.upperBound, !(b[i] == 0x3A && b[i + 1] == 0x2F && b[i + 2] == 0x2F) { i += 1 }
            if i + 2 < target.upperBound {
                let authorityStart = i + 3
                var end = authorityStart
                while end < target.upperBound, b[end] != 0x2F, b[end] != 0x3F { end += 1 }
                authority = authorityStart..<end
                pathStart = end
            }
        }
        var q = pathStart
        while q < target.upperBound, b[q] != 0x3F { q += 1 }
        path = pathStart..<q
        if q < target.upperBound { query = (q + 1)..<target.upperBound }
    }

    private mutating func parseField(
        _ b: UnsafeRawBufferPointer, line: Range<Int>, content: Range<Int>, sawTransferEncoding: inout Bool
    ) throws(FramingError) {
        let p = b.baseAddress!.assumingMemoryBound(to: UInt8.self)
        let first = p[content.lowerBound]
        if first == 0x20 || first == 0x09 { throw .obsFold }
        var i = content.lowerBound
        let end = content.upperBound
        while i < end, Self.isToken(p[i]) { i += 1 }
        guard i > content.lowerBound, i < end, p[i] == 0x3A else { throw .invalidHeaderName }
        let name = content.lowerBound..<i
        var valueStart = i + 1
        var valueEnd = end
        while valueStart < valueEnd, p[valueStart] == 0x20 || p[valueStart] == 0x09 { valueStart += 1 }
        while valueEnd > valueStart, p[valueEnd - 1] == 0x20 || p[valueEnd - 1] == 0x09 { valueEnd -= 1 }
        let value = valueStart..<valueEnd
        let kind = Self.kind(of: b, name)
        fields.append(Field(line: line, name: name, value: value, kind: kind))
        if kind == .other || kind == .authorization { return }
        let index = fields.count - 1
        switch kind {
        case .host:
            hostCount += 1
            hostField = index
        case .contentLength:
            let parsed = try Self.parseContentLength(b, value)
            if let existing = contentLength, existing != parsed { throw .conflictingContentLength }
            contentLength = parsed
        case .transferEncoding:
            if sawTransferEncoding || !Self.equalsIgnoringCase(b, value, "chunked") { throw .unsupportedTransferEncoding }
            sawTransferEncoding = true
            chunked = true
        case .upgrade:
            upgrade = true
        case .expect:
            if Self.equalsIgnoringCase(b, value, "100-continue") { expectContinueField = index }
        case .contentEncoding:
            if !Self.equalsIgnoringCase(b, value, "identity") { contentEncoded = true }
        case .contentType:
            let form: StaticString = "application/x-www-form-urlencoded"
            let prefix = value.lowerBound..<(value.lowerBound + form.utf8CodeUnitCount)
            if value.count >= form.utf8CodeUnitCount, Self.equalsIgnoringCase(b, prefix, form) {
                formBody = true
            }
        case .connection:
            if Self.hasToken(b, value, "close") { closeRequested = true }
        case .authorization, .other, .acceptEncoding:
            break
        }
    }

    /// A comma-separated list value (`Connection: keep-alive, Close`) holds `token`,
    /// compared case-insensitively.
    static func hasToken(_ b: UnsafeRawBufferPointer, _ value: Range<Int>, _ token: StaticString) -> Bool {
        var start = value.lowerBound
        while start < value.upperBound {
            var end = start
            while end < value.upperBound, b[end] != 0x2C { end += 1 }
            var lower = start
            var upper = end
            while lower < upper, b[lower] == 0x20 || b[lower] == 0x09 { lower += 1 }
            while upper > lower, b[upper - 1] == 0x20 || b[upper - 1] == 0x09 { upper -= 1 }
            if equalsIgnoringCase(b, lower..<upper, token) { return true }
            start = end + 1
        }
        return false
    }

    /// `Content-Length: 5` or the list form `5, 5` (all equal); decimal digits only.
    static func parseContentLength(_ b: UnsafeRawBufferPointer, _ value: Range<Int>) throws(FramingError) -> Int {
        var result: Int?
        var current = 0
        var digits = 0
        var i = value.lowerBound
        func finish() throws(FramingError) {
            guard digits > 0 else { throw .invalidContentLength }
            if let result, result != current { throw .conflictingContentLength }
            result = current
            current = 0
            digits = 0
        }
        while i < value.upperBound {
            let byte = b[i]
            if byte >= 0x30 && byte <= 0x39 {
                guard digits < 18 else { throw .invalidContentLength }
                current = current * 10 + Int(byte - 0x30)
                digits += 1
            } else if byte == 0x2C {
                try finish()
                while i + 1 < value.upperBound, b[i + 1] == 0x20 || b[i + 1] == 0x09 { i += 1 }
            } else {
                throw .invalidContentLength
            }
            i += 1
        }
        try finish()
        return result!
    }

    static func kind(of b: UnsafeRawBufferPointer, _ name: Range<Int>) -> FieldKind {
        switch name.count {
        case 4: return equalsIgnoringCase(b, name, "host") ? .host : .other
        case 10: return equalsIgnoringCase(b, name, "connection") ? .connection : .other
        case 6: return equalsIgnoringCase(b, name, "expect") ? .expect : .other
        case 7: return equalsIgnoringCase(b, name, "upgrade") ? .upgrade : .other
        case 12: return equalsIgnoringCase(b, name, "content-type") ? .contentType : .other
        case 13: return equalsIgnoringCase(b, name, "authorization") ? .authorization : .other
        case 14: return equalsIgnoringCase(b, name, "content-length") ? .contentLength : .other
        case 15: return equalsIgnoringCase(b, name, "accept-encoding") ? .acceptEncoding : .other
        case 16: return equalsIgnoringCase(b, name, "content-encoding") ? .contentEncoding : .other
        case 17: return equalsIgnoringCase(b, name, "transfer-encoding") ? .transferEncoding : .other
        case 19: return equalsIgnoringCase(b, name, "proxy-authorization") ? .authorization : .other
        default: return .other
        }
    }

    /// ASCII case-insensitive comparison against a lower-case literal of letters, digits and
    /// '-'. Compares eight bytes at a time: OR-ing 0x20 lower-cases letters and leaves
    /// digits and '-' as they are.
    @inline(__always)
    static func equalsIgnoringCase(_ b: UnsafeRawBufferPointer, _ range: Range<Int>, _ lower: StaticString) -> Bool {
        let count = range.count
        guard count == lower.utf8CodeUnitCount else { return false }
        let input = b.baseAddress! + range.lowerBound
        let literal = UnsafeRawPointer(lower.utf8Start)
        var k = 0
        while k + 8 <= count {
            let x = input.loadUnaligned(fromByteOffset: k, as: UInt64.self) | 0x2020_2020_2020_2020
            if x != literal.loadUnaligned(fromByteOffset: k, as: UInt64.self) { return false }
            k += 8
        }
        while k < count {
            if input.load(fromByteOffset: k, as: UInt8.self) | 0x20 != literal.load(fromByteOffset: k, as: UInt8.self) { return false }
            k += 1
        }
        return true
    }

    /// The host part of a `Host` value or an authority, or nil when the value is not a
    /// canonical `host[:port]`: a host name of letters, digits, `-`, `_` and dots (no empty
    /// label; one trailing dot allowed), an IPv4 address, or an IPv6 literal in brackets
    /// (returned without them); the port 1–5 digits. Userinfo, percent-encoding, other
    /// sub-delimiters and brackets around anything but an IPv6 address are refused.
    static func hostPart(_ b: UnsafeRawBufferPointer, _ range: Range<Int>) -> Range<Int>? {
        guard !range.isEmpty else { return nil }
        if b[range.lowerBound] == 0x5B {  // [v6]:port
            var end = range.lowerBound + 1
            while end < range.upperBound, b[end] != 0x5D { end += 1 }
            guard end < range.upperBound else { return nil }
            let rest = (end + 1)..<range.upperBound
            guard rest.isEmpty || validPort(b, rest) else { return nil }
            let literal = (range.lowerBound + 1)..<end
            let text = String(decoding: UnsafeRawBufferPointer(rebasing: b[literal]), as: UTF8.self)
            guard text.contains(":"), let address = IPAddress(text), !address.isIPv4 else { return nil }
            return literal
        }
        var colon = range.upperBound
        for i in range where b[i] == 0x3A {
            colon = i
            break
        }
        if colon < range.upperBound {
            guard validPort(b, colon..<range.upperBound) else { return nil }
        }
        let host = range.lowerBound..<colon
        return validRegisteredName(b, host) ? host : nil
    }

    /// `label(.label)*` with an optional trailing dot; labels of `A-Z a-z 0-9 - _`.
    private static func validRegisteredName(_ b: UnsafeRawBufferPointer, _ range: Range<Int>) -> Bool {
        guard !range.isEmpty else { return false }
        var labelLength = 0
        for i in range {
            let byte = b[i]
            if byte == 0x2E {
                guard labelLength > 0 else { return false }
                labelLength = 0
                continue
            }
            let ok = (byte >= 0x61 && byte <= 0x7A) || (byte >= 0x41 && byte <= 0x5A) || (byte >= 0x30 && byte <= 0x39)
                || byte == 0x2D || byte == 0x5F
            guard ok else { return false }
            labelLength += 1
        }
        return labelLength > 0 || range.count > 1
    }

    private static func validPort(_ b: UnsafeRawBufferPointer, _ range: Range<Int>) -> Bool {
        guard b[range.lowerBound] == 0x3A else { return false }
        let digits = (range.lowerBound + 1)..<range.upperBound
        return !digits.isEmpty && digits.count <= 5 && digits.allSatisfy { b[$0] >= 0x30 && b[$0] <= 0x39 }
    }
}
