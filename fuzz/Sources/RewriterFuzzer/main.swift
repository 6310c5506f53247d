import CFuzzerDriver
import KeyholeEngine
import KeyholePolicy
import NIOCore

// The engine on arbitrary bytes. The first input byte picks the context, the split, the
// mode and what an accepted upgrade is;
// the rest is the guest's stream. Invariants checked on every input:
//   - no crash, no hang (libFuzzer's timeout);
//   - the output does not depend on how the input is split;
//   - a real value only leaves the engine for a context that allows it.
// When the rest starts with `HTTP/1.`, it is an upstream's response stream instead, read by
// the ResponseMasker (the first byte picks the split and what the requests were):
//   - no crash, no hang; output and events do not depend on the split;
//   - with masking on, no real value reaches the guest raw;
//   - with masking off, the guest gets the input unchanged (or a prefix, if it breaks).
// When it starts with `H2`, the ops of one HTTP/2 stream through HTTP2Exchange (fuzzHTTP2).

let allowed = Secret(
    env: "TOKEN", value: SecretValue("FUZZ-REAL-VALUE"), allowedHosts: HostAllowList(exact: ["api.example.com"]),
    inject: Injection(headers: true, basicAuth: true, query: true, body: true))
let elsewhere = Secret(
    env: "OTHER", value: SecretValue("FUZZ-OTHER-VALUE"), allowedHosts: HostAllowList(exact: ["other.example.com"]))
let secrets = [allowed, elsewhere]
let contexts: [ConnectionIdentity] = [
    .verifiedTLS(sni: "api.example.com"),
    .verifiedTLS(sni: "evil.example.net"),
    ConnectionIdentity(sni: nil, dnsPinnedNames: ["api.example.com"], upstreamVerified: false),
    ConnectionIdentity(sni: "api.example.com", dnsPinnedNames: [], upstreamVerified: true),
]

func run(_ bytes: UnsafeRawBufferPointer, identity: ConnectionIdentity, split: Int, mode: RequestRewriter.Mode, websocket: Bool) -> ([UInt8], [RewriteEvent]) {
    var configuration = RewriterConfiguration()
    configuration.maxHeldBody = 4096
    configuration.chunkSegment = 64
    // Half the inputs (odd lengths) as on a poolable connection: a guest's
    // `Connection: close` is kept from the upstream.
    configuration.keepUpstreamAlive = bytes.count % 2 == 1
    let rewriter = RequestRewriter(identity: identity, secrets: secrets, configuration: configuration, mode: mode)
    var output = RewriteOutput()
    var upstream: [UInt8] = []
    var events: [RewriteEvent] = []
    var offset = 0
    func collect() {
        for buffer in output.upstream { upstream += buffer.readableBytesView }
        output.upstream.removeAll()
        events += output.events
        output.events.removeAll()
        if rewriter.status == .awaitingUpgradeDecision {
            rewriter.upgradeAccepted(websocket: websocket, into: &output)
            collect()
        }
    }
    while offset < bytes.count {
        let end = min(bytes.count, offset + split)
        rewriter.consume(ByteBuffer(bytes: bytes[offset..<end]), into: &output)
        collect()
        offset = end
    }
    rewriter.finish(into: &output)
    collect()
    return (upstream, events)
}

func runResponse(_ bytes: UnsafeRawBufferPointer, split: Int, masking: Bool, requests: [ExpectedResponse]) -> ([UInt8], [MaskEvent]) {
    let masker = ResponseMasker(secrets: secrets, masking: masking)
    for request in requests { masker.expect(request) }
    var output = MaskOutput()
    var guest: [UInt8] = []
    var offset = 0
    while offset < bytes.count {
        let end = min(bytes.count, offset + split)
        masker.consume(ByteBuffer(bytes: bytes[offset..<end]), into: &output)
        offset = end
    }
    masker.finish(into: &output)
    for buffer in output.guest { guest += buffer.readableBytesView }
    return (guest, output.events)
}

func fuzzResponse(_ bytes: UnsafeRawBufferPointer, selector: UInt8) {
    // Eight requests: HEAD, an upgrade to websocket, a CONNECT, or a GET, as the bits say.
    var requests: [ExpectedResponse] = []
    for k in 0..<8 {
        switch (Int(selector) >> (k % 4)) & 3 {
        case 1: requests.append(ExpectedResponse(isHead: true))
        case 2: requests.append(ExpectedResponse(upgrade: ["websocket"]))
        case 3: requests.append(ExpectedResponse(isConnect: k == 7))
        default: requests.append(ExpectedResponse())
        }
    }
    let split = Int((selector >> 2) & 0x1F) + 1
    for masking in [true, false] {
        let whole = runResponse(bytes, split: Int.max, masking: masking, requests: requests)
        let pieces = runResponse(bytes, split: split, masking: masking, requests: requests)
        precondition(whole.0 == pieces.0, "response output depends on the split")
        precondition(whole.1 == pieces.1, "response events depend on the split")
        if masking {
            let text = String(decoding: whole.0, as: UTF8.self)
            precondition(!text.contains("FUZZ-REAL-VALUE") && !text.contains("FUZZ-OTHER-VALUE"), "a real value reached the guest")
        } else {
            precondition(whole.0.count <= bytes.count && whole.0.elementsEqual(bytes.prefix(whole.0.count)), "an unmasked response was altered")
        }
    }
}

/// An HTTP/2 stream through `HTTP2Exchange` (inputs that start with `H2`). The bytes are
/// ops: a request header block, DATA, trailers, a response header block, DATA, trailers,
/// each a tag byte, a length byte and that many bytes (fields split at NUL and `=`, which
/// gives names and values with any other byte in them, CR and LF included).
///   - no crash, no hang;
///   - a real value goes upstream only for the verified context, with a `substituted` event,
///     and never in a field name;
///   - with masking on, no real value reaches the guest raw, in any field or DATA.
func fuzzHTTP2(_ bytes: UnsafeRawBufferPointer, selector: UInt8) {
    let identity = contexts[Int(selector & 3)]
    var configuration = RewriterConfiguration()
    configuration.maxHeldBody = 4096
    configuration.identityResponses = selector & 0x04 != 0
    let stream = HTTP2Exchange(identity: identity, secrets: secrets, configuration: configuration, masking: true)
    var output = H2Output()
    var offset = 0
    var requestHeaders = false
    var responseHeaders = false
    func fields(_ raw: UnsafeRawBufferPointer.SubSequence) -> [H2Field] {
        raw.split(separator: 0, omittingEmptySubsequences: false).map { pair in
            let parts = pair.split(separator: UInt8(ascii: "="), maxSplits: 1, omittingEmptySubsequences: false)
            return H2Field(String(decoding: parts[0], as: UTF8.self), parts.count > 1 ? String(decoding: parts[1], as: UTF8.self) : "")
        }
    }
    while offset + 2 <= bytes.count {
        let tag = bytes[offset] % 6, end = bytes[offset] & 0x80 != 0
        let length = min(Int(bytes[offset + 1]), bytes.count - offset - 2)
        let body = bytes[(offset + 2)..<(offset + 2 + length)]
        offset += 2 + length
        switch tag {
        case 0:
            // Every request starts with the pseudo-headers (the fuzzer's fields follow).
            let base = [H2Field(":method", "POST"), H2Field(":scheme", "https"), H2Field(":path", "/p"), H2Field(":authority", identity.sni ?? "api.example.com")]
            stream.requestHeaders((requestHeaders ? [] : base) + fields(body), endStream: end, into: &output)
            requestHeaders = true
        case 1: stream.requestData(ByteBuffer(bytes: body), endStream: end, into: &output)
        case 2: stream.requestTrailers(fields(body), into: &output)
        case 3:
            stream.responseHeaders((responseHeaders ? [] : [H2Field(":status", "200")]) + fields(body), endStream: end, into: &output)
            responseHeaders = true
        case 4: stream.responseData(ByteBuffer(bytes: body), endStream: end, into: &output)
        default: stream.responseTrailers(fields(body), into: &output)
        }
    }
    func text(_ parts: [H2Part]) -> (fields: String, names: String, data: String) {
        var all = "", names = "", data = ""
        for part in parts {
            switch part {
            case .headers(let fields, _):
                for field in fields {
                    all += field.name + ":" + field.value + "\n"
                    names += field.name + "\n"
                }
            case .data(let buffer): data += String(buffer: buffer)
            case .end: break
            }
        }
        return (all, names, data)
    }
    // Masking is on: whatever the upstream sends (values spelled out included), the guest
    // never gets one raw.
    let guest = text(output.guest)
    precondition(!(guest.fields + guest.data).contains("FUZZ-REAL-VALUE") && !(guest.fields + guest.data).contains("FUZZ-OTHER-VALUE"), "a real value reached the guest")
    // Values the request spells out itself prove nothing about substitution.
    let input = String(decoding: bytes, as: UTF8.self)
    guard !input.contains("FUZZ-") else { return }
    let up = text(output.upstream)
    precondition(!up.names.contains("FUZZ-"), "a real value in a field name")
    precondition(!(up.fields + up.data).contains("FUZZ-OTHER-VALUE"), "a value was sent to a host that may not receive it")
    if (up.fields + up.data).contains("FUZZ-REAL-VALUE") {
        precondition(identity == contexts[0], "a value left without a verified identity")
        precondition(output.rewriteEvents.contains { if case .substituted = $0 { return true } else { return false } }, "a value left without an event")
    }
}

/// SwiftPM links `main` to this symbol; hand control to libFuzzer's driver.
@_cdecl("RewriterFuzzer_main")
public func fuzzerMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    var count = argc
    var arguments = argv
    return LLVMFuzzerRunDriver(&count, &arguments) { data, size in fuzz(data, size) }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    guard let data else { return 0 }
    guard size > 0 else { return 0 }
    let selector = data[0]
    let bytes = UnsafeRawBufferPointer(start: data + 1, count: size - 1)
    if bytes.starts(with: "HTTP/1.".utf8) {
        fuzzResponse(bytes, selector: selector)
        return 0
    }
    if bytes.starts(with: "H2".utf8) {
        fuzzHTTP2(UnsafeRawBufferPointer(rebasing: bytes.dropFirst(2)), selector: selector)
        return 0
    }
    let identity = contexts[Int(selector & 3)]
    let mode: RequestRewriter.Mode = selector & 0x80 != 0 ? .opaque : .http
    let split = Int((selector >> 2) & 0x1F) + 1
    // An accepted upgrade is a WebSocket (its frames parsed) or any other protocol (relayed).
    let websocket = selector & 0x40 != 0
    let whole = run(bytes, identity: identity, split: Int.max, mode: mode, websocket: websocket)
    let pieces = run(bytes, identity: identity, split: split, mode: mode, websocket: websocket)
    precondition(whole.0 == pieces.0, "output depends on the split")
    precondition(whole.1 == pieces.1, "events depend on the split")
    // Values the input itself spells out prove nothing; skip those inputs.
    let input = String(decoding: bytes, as: UTF8.self)
    guard !input.contains("FUZZ-") else { return 0 }
    let text = String(decoding: whole.0, as: UTF8.self)
    if text.contains("FUZZ-OTHER-VALUE") {
        preconditionFailure("a value was sent to a host that may not receive it")
    }
    if text.contains("FUZZ-REAL-VALUE") {
        precondition(identity == contexts[0], "a value left without a verified identity")
        precondition(whole.1.contains { if case .substituted = $0 { return true } else { return false } }, "a value left without an event")
    }
    return 0
}
