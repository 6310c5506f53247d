import KeyholeEngine
import KeyholePolicy
import Testing

@Suite("Identity rules and violations")
struct IdentityAndViolationTests {
    let header = "GET /repos HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Bearer $MSB_TOKEN\r\n\r\n"

    @Test func domainFrontingSNIAllowedHostElsewhere() {
        let run = rewrite("GET / HTTP/1.1\r\nHost: evil.example.net\r\nAuthorization: Bearer $MSB_TOKEN\r\n\r\n")
        #expect(run.bytes.isEmpty)
        #expect(run.violations.first?.reason == .hostMismatch)
        #expect(run.violations.first?.request?.host == "evil.example.net")
    }

    /// What a session's audit line cache keys on: method, path and Host, byte for byte.
    @Test func aRequestSummaryComparesItsTargetByBytes() throws {
        func summary(_ target: String, host: String?) throws -> RequestSummary {
            let hostLine = host.map { "Host: \($0)\r\n" } ?? ""
            let run = rewrite("GET \(target) HTTP/1.1\r\n\(hostLine)X: $MSB_TOKEN\r\n\r\n")
            let requests: [RequestSummary] = run.events.compactMap {
                switch $0 {
                case .violation(let violation): violation.request
                case .hostMismatch(let request), .framingError(_, let request): request
                default: nil
                }
            }
            return try #require(requests.first, "\(run.events)")
        }
        let a = try summary("/a?q=1", host: "evil.example.net")
        let target = a.targetBytes
        #expect(target == RequestSummary.TargetBytes(method: Array("GET".utf8), path: Array("/a".utf8), host: Array("evil.example.net".utf8)))
        #expect(a.hasTarget(target))
        #expect(try summary("/a?q=2", host: "evil.example.net").hasTarget(target), "the query is not part of it")
        #expect(try !summary("/b", host: "evil.example.net").hasTarget(target))
        #expect(try !summary("/a", host: "evil.example.ne").hasTarget(target))
        let noHost = try summary("/a", host: nil)
        #expect(noHost.targetBytes.host == nil)
        #expect(!noHost.hasTarget(target) && !a.hasTarget(noHost.targetBytes))
        #expect(RequestSummary(method: "GET", path: "/a", host: "evil.example.net").hasTarget(target))
    }

    @Test func domainFrontingSNIElsewhereHostAllowed() {
        let run = rewrite(header, identity: .verifiedTLS(sni: "evil.example.net"))
        #expect(run.bytes.isEmpty)
        #expect(run.violations.first?.reason == .hostMismatch)
    }

    @Test func allowedSNIAndHostButNotAllowedSecretHost() {
        let run = rewrite(header.replacingOccurrences(of: "api.example.com", with: "other.example.com"), identity: .verifiedTLS(sni: "other.example.com"))
        #expect(run.violations.first?.reason == .hostNotAllowed)
        #expect(run.violations.first?.secret == "TOKEN")
    }

    @Test func duplicateOrMissingHostHeaders() {
        let twice = rewrite("GET / HTTP/1.1\r\nHost: api.example.com\r\nHost: api.example.com\r\nX: $MSB_TOKEN\r\n\r\n")
        #expect(twice.violations.first?.reason == .hostMismatch)
        let none = rewrite("GET / HTTP/1.1\r\nX: $MSB_TOKEN\r\n\r\n")
        #expect(none.violations.first?.reason == .hostMismatch)
    }

    @Test func absoluteFormTargetMustAgree() {
        let mismatch = rewrite("GET https://evil.example.net/x HTTP/1.1\r\nHost: api.example.com\r\nX: $MSB_TOKEN\r\n\r\n")
        #expect(mismatch.violations.first?.reason == .hostMismatch)
        let agree = rewrite("GET https://api.example.com/x HTTP/1.1\r\nHost: api.example.com\r\nX: $MSB_TOKEN\r\n\r\n")
        #expect(agree.text.contains("X: real-token-value"))
        let userinfo = rewrite("GET https://u@api.example.com/x HTTP/1.1\r\nHost: api.example.com\r\nX: $MSB_TOKEN\r\n\r\n")
        #expect(userinfo.violations.first?.reason == .hostMismatch)
    }

    @Test func domainFrontingIsRefusedEvenWithoutAPlaceholder() {
        // TLS to api.example.com, Host elsewhere: nothing of it goes upstream.
        let fronted = rewrite("GET / HTTP/1.1\r\nHost: elsewhere.example.net\r\n\r\n")
        #expect(fronted.bytes.isEmpty)
        #expect(fronted.hostMismatches == 1)
        #expect(fronted.status == .blocked)
        // The same in the second request of a keep-alive connection: the first one passes.
        let ok = "GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n"
        let second = rewrite(ok + "GET / HTTP/1.1\r\nHost: elsewhere.example.net\r\n\r\n")
        #expect(second.text == ok)
        #expect(second.hostMismatches == 1)
        // Plain HTTP: an absolute-form target that disagrees with the Host.
        let plain = ConnectionIdentity(sni: nil, dnsPinnedNames: [], upstreamVerified: false)
        let smuggled = rewrite("GET http://evil.example.net/ HTTP/1.1\r\nHost: api.example.com\r\n\r\n", identity: plain)
        #expect(smuggled.bytes.isEmpty)
        #expect(smuggled.hostMismatches == 1)
        // A port on either side does not matter; case and a trailing dot do not either.
        let ported = "GET https://API.example.com.:443/ HTTP/1.1\r\nHost: api.example.com:443\r\n\r\n"
        #expect(rewrite(ported).text == ported)
    }

    @Test(arguments: [
        ("Host: [api.example.com]", FramingError.invalidHost),
        ("Host: [api.example.com]:443", .invalidHost),
        ("Host: [203.0.113.10]", .invalidHost),
        ("Host: api.example.com:", .invalidHost),
        ("Host: api.example.com:4430000", .invalidHost),
        ("Host: api.example.com:https", .invalidHost),
        ("Host: user@api.example.com", .invalidHost),
        ("Host: api%2Eexample.com", .invalidHost),
        ("Host: api.example.com, evil.example.net", .invalidHost),
        ("Host: api..example.com", .invalidHost),
        ("Host: .api.example.com", .invalidHost),
        ("Host: api.example.com/x", .invalidHost),
        ("Host:", .invalidHost),
        ("Host: api.example.com\r\nHost: api.example.com", .duplicateHost),
        ("X-Other: 1", .missingHost),
    ])
    func aHostMustBeExactlyOnePlainAuthority(_ field: String, _ error: FramingError) {
        let run = rewrite("GET / HTTP/1.1\r\n\(field)\r\n\r\n")
        #expect(run.bytes.isEmpty)
        #expect(run.framingErrors == [error])
        // With a placeholder in it, the same request is a violation (block-and-terminate
        // applies), and still nothing goes upstream.
        let carrying = rewrite("GET / HTTP/1.1\r\n\(field)\r\nAuthorization: Bearer $MSB_TOKEN\r\n\r\n")
        #expect(carrying.bytes.isEmpty)
        #expect(carrying.violations.first?.reason == .hostMismatch)
        #expect(carrying.framingErrors.isEmpty)
    }

    @Test func theAuthorityOfAnAbsoluteTargetMustBePlainToo() {
        let run = rewrite("GET https://[api.example.com]/ HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
        #expect(run.framingErrors == [.invalidHost])
    }

    @Test func ipv6LiteralsInBracketsCompareAsAddresses() {
        // A guest that connected to an IPv6 address without SNI: the identity is the address.
        let bare = ConnectionIdentity(sni: "2001:db8::1", dnsPinnedNames: [], upstreamVerified: false)
        let input = "GET / HTTP/1.1\r\nHost: [2001:DB8:0::1]:8443\r\n\r\n"
        #expect(rewrite(input, identity: bare).text == input)
        #expect(rewrite("GET / HTTP/1.1\r\nHost: [2001:db8::2]\r\n\r\n", identity: bare).hostMismatches == 1)
    }

    @Test func anSNIThatIsNotAHostNameIsNoName() {
        // `*.cdn.example.com` matches "bad-.cdn.example.com" textually; it is not a host name.
        let patterned = secret("TOKEN", value: "v", hosts: [], patterns: ["*.cdn.example.com"])
        let name = "bad-.cdn.example.com"
        let run = rewrite(
            "GET / HTTP/1.1\r\nHost: \(name)\r\nAuthorization: Bearer $MSB_TOKEN\r\n\r\n", secrets: [patterned],
            identity: .verifiedTLS(sni: name))
        #expect(run.bytes.isEmpty)
        #expect(run.violations.first?.reason == .hostNotAllowed)
        let valid = "ok.cdn.example.com"
        let allowed = rewrite(
            "GET / HTTP/1.1\r\nHost: \(valid)\r\nAuthorization: Bearer $MSB_TOKEN\r\n\r\n", secrets: [patterned],
            identity: .verifiedTLS(sni: valid))
        #expect(allowed.text.contains("Bearer v\r\n"))
    }

    @Test func unverifiedUpstreamBlocksUnlessTheSecretWaivesTLSIdentity() {
        let unverified = ConnectionIdentity(sni: "api.example.com", dnsPinnedNames: ["api.example.com"], upstreamVerified: false)
        #expect(rewrite(header, identity: unverified).violations.first?.reason == .upstreamUnverified)
        let relaxed = secret("TOKEN", value: "real-token-value", requireTLS: false)
        #expect(rewrite(header, secrets: [relaxed], identity: unverified).text.contains("Bearer real-token-value"))
    }

    @Test func connectingToAnAddressNeverResolvedForTheNameBlocks() {
        let unpinned = ConnectionIdentity(sni: "api.example.com", dnsPinnedNames: [], upstreamVerified: true)
        let run = rewrite(header, identity: unpinned)
        #expect(run.bytes.isEmpty)
        #expect(run.violations.first?.reason == .dnsNotPinned)
    }

    @Test func plainHTTPToAnAllowedHostWithTLSIdentityRequired() {
        let plain = ConnectionIdentity(sni: nil, dnsPinnedNames: ["api.example.com"], upstreamVerified: false)
        let run = rewrite(header, identity: plain)
        #expect(run.violations.first?.reason == .plainHTTP)
    }

    @Test func plainHTTPWithTLSIdentityWaivedNeedsTheDNSPin() {
        let relaxed = secret("TOKEN", value: "real-token-value", requireTLS: false)
        let pinned = ConnectionIdentity(sni: nil, dnsPinnedNames: ["api.example.com"], upstreamVerified: false)
        #expect(rewrite(header, secrets: [relaxed], identity: pinned).text.contains("Bearer real-token-value"))
        let unpinned = ConnectionIdentity(sni: nil, dnsPinnedNames: ["other.example.com"], upstreamVerified: false)
        #expect(rewrite(header, secrets: [relaxed], identity: unpinned).violations.first?.reason == .dnsNotPinned)
    }

    @Test(arguments: [
        ("GET /$MSB_TOKEN HTTP/1.1\r\nHost: api.example.com\r\n\r\n", Site.path),
        ("$MSB_TOKEN / HTTP/1.1\r\nHost: api.example.com\r\n\r\n", Site.method),
        ("GET / HTTP/1.1\r\nHost: api.example.com\r\nX-$MSB_TOKEN: 1\r\n\r\n", Site.headerName),
        ("GET https://$MSB_TOKEN@api.example.com/ HTTP/1.1\r\nHost: api.example.com\r\n\r\n", Site.path),
    ])
    func sitesThatAreNeverSubstituted(_ input: String, _ site: Site) {
        let everything = secret("TOKEN", value: "v", inject: Injection(headers: true, basicAuth: true, query: true, body: true))
        let run = rewrite(input, secrets: [everything])
        #expect(run.bytes.isEmpty)
        #expect(run.violations.first?.site == site)
        #expect(run.violations.first?.reason == .neverSubstituted)
    }

    @Test(arguments: [
        ("X: %24MSB_TOKEN", PlaceholderForm.percentEncoded),
        ("X: \\u0024MSB_TOKEN", PlaceholderForm.jsonEscaped),
        ("X: %24%4D%53%42%5F%54%4F%4B%45%4E", PlaceholderForm.percentEncoded),
        ("X: \\u0024\\u004dSB_TOKEN", PlaceholderForm.jsonEscaped),
    ])
    func encodedFormsInHeadersAreViolations(_ line: String, _ form: PlaceholderForm) {
        let run = rewrite("GET / HTTP/1.1\r\nHost: api.example.com\r\n\(line)\r\n\r\n")
        #expect(run.violations.first?.form == form)
        #expect(run.violations.first?.reason == .encodedForm)
    }

    @Test func encodedFormsBoundForADisallowedHostAreViolations() {
        let elsewhere = ConnectionIdentity.verifiedTLS(sni: "evil.example.net")
        for (input, site, form) in [
            ("GET /?q=%24MSB_TOKEN HTTP/1.1\r\nHost: evil.example.net\r\n\r\n", Site.query, PlaceholderForm.percentEncoded),
            ("GET / HTTP/1.1\r\nHost: evil.example.net\r\nAuthorization: Basic dTokTVNCX1RPS0VO\r\n\r\n", .basicAuth, .base64),
            ("POST / HTTP/1.1\r\nHost: evil.example.net\r\nContent-Length: 21\r\n\r\n{\"a\":\"\\u0024MSB_TOKEN\"", .body, .jsonEscaped),
        ] {
            let run = rewrite(input, identity: elsewhere)
            #expect(run.violations.first?.site == site)
            #expect(run.violations.first?.form == form)
            #expect(run.violations.first?.reason == .hostNotAllowed)
            #expect(run.status == .blocked)
        }
    }

    @Test func aStreamedBodyStopsRightBeforeThePlaceholder() {
        // Body injection is off: the body streams, and the violation cuts it exactly at the
        // placeholder, however the bytes arrived.
        let prefix = "POST /upload HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 40\r\n\r\nsafe-bytes-before|"
        let input = prefix + "$MSB_TOKEN|after-the-token.."
        for chunk in chunkSizes {
            let run = rewrite(input, chunk: chunk)
            #expect(run.text == prefix, "chunk \(String(describing: chunk))")
            #expect(run.violations.first?.site == .body)
            #expect(run.violations.first?.reason == .injectionDisabled)
        }
    }

    @Test func aViolationInAPipelinedRequestKeepsTheEarlierOnes() {
        let first = "GET /1 HTTP/1.1\r\nHost: api.example.com\r\nX: $MSB_TOKEN\r\n\r\n"
        let second = "GET /2 HTTP/1.1\r\nHost: api.example.com\r\nX: $MSB_TOKEN\r\n\r\n"
        let third = "GET /3 HTTP/1.1\r\nHost: evil.example.net\r\nX: $MSB_TOKEN\r\n\r\n"
        let fourth = "GET /4 HTTP/1.1\r\nHost: api.example.com\r\n\r\n"
        for chunk in chunkSizes {
            let run = rewrite(first + second + third + fourth, chunk: chunk)
            #expect(run.text == (first + second).replacingOccurrences(of: "$MSB_TOKEN", with: "real-token-value"))
            #expect(run.violations.count == 1)
            #expect(run.violations.first?.request?.path == "/3")
        }
    }

    @Test func contentEncodedBodiesAreNeverAltered() {
        let s = secret("TOKEN", value: "V", inject: Injection(body: true))
        let run = rewrite(
            "POST / HTTP/1.1\r\nHost: api.example.com\r\nContent-Encoding: gzip\r\nContent-Length: 10\r\n\r\n$MSB_TOKEN", secrets: [s])
        #expect(run.violations.first?.reason == .contentEncoded)
        #expect(run.text == "POST / HTTP/1.1\r\nHost: api.example.com\r\nContent-Encoding: gzip\r\nContent-Length: 10\r\n\r\n")
    }

    @Test func eventsNeverCarryTheValueOrTheQuery() {
        let everything = secret("TOKEN", value: "real-token-value", inject: Injection(headers: true, basicAuth: true, query: true, body: true))
        let runs = [
            rewrite("GET /p?key=$MSB_TOKEN&other=secretquery HTTP/1.1\r\nHost: api.example.com\r\nX: $MSB_TOKEN\r\n\r\n", secrets: [everything]),
            rewrite("GET /p?other=secretquery HTTP/1.1\r\nHost: api.example.com\r\nX-$MSB_TOKEN: 1\r\n\r\n", secrets: [everything]),
        ]
        for run in runs {
            #expect(!run.events.isEmpty)
            for event in run.events {
                let text = String(describing: event) + String(reflecting: event)
                #expect(!text.contains("real-token-value"))
                #expect(!text.contains("secretquery"))
            }
        }
    }
}
