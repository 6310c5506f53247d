import NIOCore

/// Where in a request a placeholder was found.
public enum Site: String, Sendable, Hashable {
    case method
    case path
    case query
    case headerName = "header-name"
    case header
    case basicAuth = "basic_auth"
    case body
    case trailer
    /// A WebSocket message the guest sends after a `101` for `websocket`.
    case websocket = "websocket-message"
    /// After a `101 Switching Protocols` (or a `CONNECT` tunnel): relayed and scanned.
    case upgraded = "upgraded-stream"
    /// A connection that is not HTTP: relayed and scanned.
    case opaque = "opaque-stream"
}

/// Why a placeholder was not substituted (the request is blocked).
public enum ViolationReason: String, Sendable, Hashable {
    case hostNotAllowed = "host-not-allowed"
    case hostMismatch = "host-header-mismatch"
    case unknownDestination = "unknown-destination"
    case dnsNotPinned = "dns-not-pinned"
    case plainHTTP = "tls-identity-required"
    case upstreamUnverified = "upstream-unverified"
    case injectionDisabled = "injection-disabled"
    case neverSubstituted = "site-never-substituted"
    case encodedForm = "form-not-substitutable"
    case contentEncoded = "content-encoded-body"
    /// In a WebSocket message, split across its frames (substituted only within one frame).
    case splitAcrossFrames = "split-across-frames"
    /// In a binary WebSocket message, or a text message too large to hold.
    case binaryOrLargeMessage = "binary-or-large-message"
}

/// The request a decision was about. Never carries the query (it can hold credentials).
/// Built lazily from the request head, so requests that produce no event pay nothing.
public struct RequestSummary: Sendable, Hashable {
    enum Storage: Sendable {
        case strings(method: String, path: String, host: String?)
        case head(ByteBuffer, method: Range<Int>, path: Range<Int>, host: Range<Int>?)
    }

    let storage: Storage

    public init(method: String, path: String, host: String?) {
        storage = .strings(method: method, path: path, host: host)
    }

    init(head: ByteBuffer, method: Range<Int>, path: Range<Int>, host: Range<Int>?) {
        storage = .head(head, method: method, path: path, host: host)
    }

    private func text(_ head: ByteBuffer, _ range: Range<Int>) -> String {
        head.getString(at: head.readerIndex + range.lowerBound, length: range.count) ?? ""
    }

    public var method: String {
        switch storage {
        case .strings(let method, _, _): return method
        case .head(let head, let method, _, _): return text(head, method)
        }
    }

    /// The request target's path, without query.
    public var path: String {
        switch storage {
        case .strings(_, let path, _): return path
        case .head(let head, _, let path, _): return text(head, path)
        }
    }

    /// The `Host` header, if exactly one was present.
    public var host: String? {
        switch storage {
        case .strings(_, _, let host): return host
        case .head(let head, _, _, let host): return host.map { text(head, $0) }
        }
    }

    /// The raw bytes of the method, the path and the `Host` value (before any repair of
    /// invalid UTF-8 that the `String` properties make).
    public struct TargetBytes: Sendable, Equatable {
        public var method: [UInt8]
        public var path: [UInt8]
        public var host: [UInt8]?

        public init(method: [UInt8], path: [UInt8], host: [UInt8]?) {
            self.method = method
            self.path = path
            self.host = host
        }
    }

    public var targetBytes: TargetBytes {
        switch storage {
        case .strings(let method, let path, let host):
            return TargetBytes(method: Array(method.utf8), path: Array(path.utf8), host: host.map { Array($0.utf8) })
        case .head(let head, let method, let path, let host):
            return head.withUnsafeReadableBytes { b in
                TargetBytes(method: Array(b[method]), path: Array(b[path]), host: host.map { Array(b[$0]) })
            }
        }
    }

    /// Whether this request's method, path and `Host` are `target`'s, compared where they
    /// lie (no `String` or array is made for a request read from a head).
    public func hasTarget(_ target: TargetBytes) -> Bool {
        switch storage {
        case .strings:
            return targetBytes == target
        case .head(let head, let method, let path, let host):
            return head.withUnsafeReadableBytes { b in
                guard b[method].elementsEqual(target.method), b[path].elementsEqual(target.path) else { return false }
                switch (host, target.host) {
                case (nil, nil): return true
                case (let range?, let bytes?): return b[range].elementsEqual(bytes)
                default: return false
                }
            }
        }
    }

    public static func == (a: RequestSummary, b: RequestSummary) -> Bool {
        a.method == b.method && a.path == b.path && a.host == b.host
    }

    public func hash(into hasher: inout Hasher) {
        hasher.combine(method)
        hasher.combine(path)
        hasher.combine(host)
    }
}

extension RequestSummary: CustomStringConvertible {
    public var description: String { "\(method) \(path) (Host: \(host ?? "-"))" }
}

public struct Violation: Sendable, Hashable {
    /// The secret's environment variable name (never its value).
    public var secret: String
    public var site: Site
    public var form: PlaceholderForm
    public var reason: ViolationReason
    public var request: RequestSummary?
}

/// Ways a request stream can be broken. Any of them ends the connection (BRIEF §4).
public enum FramingError: String, Sendable, Hashable, Error {
    case headerBlockTooLarge = "header-block-too-large"
    case tooManyHeaderFields = "too-many-header-fields"
    case malformedRequestLine = "malformed-request-line"
    case unsupportedHTTPVersion = "unsupported-http-version"
    case bareCR = "bare-cr"
    case bareLF = "bare-lf"
    case nulByte = "nul-byte"
    case controlCharacter = "control-character"
    case obsFold = "obs-fold"
    case invalidHeaderName = "invalid-header-name"
    case contentLengthWithTransferEncoding = "content-length-with-transfer-encoding"
    case conflictingContentLength = "conflicting-content-length"
    case invalidContentLength = "invalid-content-length"
    case unsupportedTransferEncoding = "unsupported-transfer-encoding"
    case transferEncodingInHTTP10 = "transfer-encoding-in-http-1.0"
    case malformedChunk = "malformed-chunk"
    case trailersTooLarge = "trailers-too-large"
    case bodyTooLargeToSubstitute = "body-too-large-to-substitute"
    case incompleteRequest = "incomplete-request"
    case missingHost = "missing-host"
    case duplicateHost = "duplicate-host"
    case invalidHost = "invalid-host"
    case upgradeHoldExceeded = "upgrade-hold-exceeded"
    case heldBodyBudgetExhausted = "held-body-budget-exhausted"
    case websocketProtocol = "websocket-protocol-error"
    case malformedHTTP2Request = "malformed-http2-request"

    public var explanation: String {
        switch self {
        case .headerBlockTooLarge: return "the header block is larger than the limit"
        case .tooManyHeaderFields: return "the header block has more than 1023 fields"
        case .malformedRequestLine: return "the request line is not METHOD SP target SP HTTP/1.x"
        case .unsupportedHTTPVersion: return "only HTTP/1.0 and HTTP/1.1 are handled"
        case .bareCR: return "a CR not followed by LF in the header block"
        case .bareLF: return "a LF without CR in the header block"
        case .nulByte: return "a NUL byte in the header block"
        case .controlCharacter: return "a control character in the header block"
        case .obsFold: return "an obsolete line folding (a header line starting with whitespace)"
        case .invalidHeaderName: return "a header name that is not a token (or whitespace before the colon)"
        case .contentLengthWithTransferEncoding: return "both Content-Length and Transfer-Encoding"
        case .conflictingContentLength: return "several Content-Length values that differ"
        case .invalidContentLength: return "a Content-Length that is not a decimal number"
        case .unsupportedTransferEncoding: return "a Transfer-Encoding other than chunked"
        case .transferEncodingInHTTP10: return "Transfer-Encoding in an HTTP/1.0 request"
        case .malformedChunk: return "a malformed chunk in a chunked body"
        case .trailersTooLarge: return "the chunked trailers are larger than the limit"
        case .bodyTooLargeToSubstitute: return "the body exceeds the limit for body substitution"
        case .incompleteRequest: return "the connection ended in the middle of a request"
        case .missingHost: return "the request has no Host header"
        case .duplicateHost: return "the request has more than one Host header"
        case .websocketProtocol:
            return "a WebSocket frame from the guest breaks RFC 6455 (unmasked, reserved bits or opcode, or a bad control frame), or uses an extension Keyhole cannot read"
        case .heldBodyBudgetExhausted:
            return "the proxy already holds as many bodies for substitution as its memory budget allows (send this one chunked, or retry)"
        case .malformedHTTP2Request:
            return "an HTTP/2 request without exactly one :method, :path and :authority, with an unknown pseudo-header, a CONNECT, or trailers without a body"
        case .upgradeHoldExceeded: return "more bytes after an upgrade request than are held until the upstream answers it"
        case .invalidHost: return "the Host header or the target's authority is not a plain host[:port] (brackets only around an IPv6 address)"
        }
    }
}

/// What the engine decided, in order. No event ever carries a secret's value.
public enum RewriteEvent: Sendable, Hashable {
    /// A placeholder was replaced by the real value (reported once per request, secret and site).
    case substituted(secret: String, site: Site, request: RequestSummary)
    /// A placeholder bound where it may not go: the connection must be reset.
    case violation(Violation)
    /// The stream is not valid HTTP/1.x framing: the connection must be reset.
    case framingError(FramingError, request: RequestSummary?)
    /// The Host (or the target's authority) names another host than the TLS server name,
    /// or the two disagree: domain fronting, refused whether or not a placeholder is in the
    /// request (a request that carries one is reported as a `violation` instead). The
    /// connection must be reset.
    case hostMismatch(request: RequestSummary?)
    /// A placeholder went on unchanged to one of its secret's passthrough hosts (reported once
    /// per request, secret and site); not a violation.
    case passedThrough(secret: String, site: Site, request: RequestSummary)
}
