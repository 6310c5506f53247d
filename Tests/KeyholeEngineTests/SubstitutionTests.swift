import KeyholeEngine
import KeyholePolicy
import Testing

@Suite("Substitution sites")
struct SubstitutionTests {
    @Test func headerValue() {
        let run = rewrite("GET /user HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Bearer $MSB_TOKEN\r\nAccept: */*\r\n\r\n")
        #expect(run.text == "GET /user HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Bearer real-token-value\r\nAccept: */*\r\n\r\n")
        #expect(run.status == .open)
        #expect(run.substitutions.map(\.1) == [.header])
    }

    @Test func severalPlaceholdersInOneValueAndSeveralHeaders() {
        let run = rewrite("GET / HTTP/1.1\r\nHost: api.example.com\r\nX-A: $MSB_TOKEN:$MSB_TOKEN\r\nX-B: x$MSB_TOKEN\r\n\r\n")
        #expect(run.text == "GET / HTTP/1.1\r\nHost: api.example.com\r\nX-A: real-token-value:real-token-value\r\nX-B: xreal-token-value\r\n\r\n")
        #expect(run.substitutions.count == 1, "one event per request, secret and site")
    }

    @Test func basicAuthIsDecodedReplacedAndReencoded() {
        // base64("ci:$MSB_TOKEN")
        let run = rewrite("GET /v2/ HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Basic Y2k6JE1TQl9UT0tFTg==\r\n\r\n")
        // base64("ci:real-token-value")
        #expect(run.text == "GET /v2/ HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Basic Y2k6cmVhbC10b2tlbi12YWx1ZQ==\r\n\r\n")
        #expect(run.substitutions.map(\.1) == [.basicAuth])
    }

    @Test func basicAuthWithBasicAuthOffIsAViolation() {
        let s = secret("TOKEN", value: "v", inject: Injection(headers: true, basicAuth: false))
        let run = rewrite("GET / HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Basic Y2k6JE1TQl9UT0tFTg==\r\n\r\n", secrets: [s])
        #expect(run.bytes.isEmpty)
        #expect(run.violations.first?.site == .basicAuth)
        #expect(run.violations.first?.form == .base64)
        #expect(run.violations.first?.reason == .injectionDisabled)
        #expect(run.status == .blocked)
    }

    @Test func queryRawAndPercentEncodedGetAPercentEncodedValue() {
        let s = secret("KEY", value: "a b&c/=", inject: Injection(headers: false, basicAuth: false, query: true))
        let run = rewrite("GET /maps?key=$MSB_KEY&k2=%24MSB_KEY&k3=%24%4d%53%42_KEY HTTP/1.1\r\nHost: api.example.com\r\n\r\n", secrets: [s])
        #expect(run.text == "GET /maps?key=a%20b%26c%2F%3D&k2=a%20b%26c%2F%3D&k3=a%20b%26c%2F%3D HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
        #expect(run.substitutions.map(\.1) == [.query])
    }

    @Test func queryIsOffByDefault() {
        let run = rewrite("GET /x?key=$MSB_TOKEN HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
        #expect(run.bytes.isEmpty)
        #expect(run.violations.first?.site == .query)
        #expect(run.violations.first?.reason == .injectionDisabled)
    }

    @Test func contentLengthBodyIsRewrittenWithItsNewLength() {
        let s = secret("TOKEN", value: "real-token-value", inject: Injection(body: true))
        let body = "{\"token\":\"$MSB_TOKEN\",\"again\":\"$MSB_TOKEN\"}"
        let input = "POST /p HTTP/1.1\r\nHost: api.example.com\r\nContent-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)"
        for chunk in chunkSizes {
            let run = rewrite(input, secrets: [s], chunk: chunk)
            let expectedBody = "{\"token\":\"real-token-value\",\"again\":\"real-token-value\"}"
            #expect(
                run.text == "POST /p HTTP/1.1\r\nHost: api.example.com\r\nContent-Type: application/json\r\nContent-Length: \(expectedBody.utf8.count)\r\n\r\n\(expectedBody)",
                "chunk \(String(describing: chunk))")
        }
    }

    @Test func formBodyGetsPercentEncodedValues() {
        let s = secret("TOKEN", value: "p@ss word", inject: Injection(body: true))
        let body = "user=ci&password=%24MSB_TOKEN&raw=$MSB_TOKEN"
        let run = rewrite(
            "POST /login HTTP/1.1\r\nHost: api.example.com\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)",
            secrets: [s])
        let expected = "user=ci&password=p%40ss%20word&raw=p%40ss%20word"
        #expect(run.text.hasSuffix("Content-Length: \(expected.utf8.count)\r\n\r\n\(expected)"))
    }

    @Test func chunkedBodyIsReframedAndAPlaceholderSplitAcrossChunksIsFound() {
        let s = secret("TOKEN", value: "real-token-value", inject: Injection(body: true))
        // "$MSB_TO" | "KEN rest" : the placeholder straddles two chunks.
        let input = "POST /u HTTP/1.1\r\nHost: api.example.com\r\nTransfer-Encoding: chunked\r\n\r\n7\r\n$MSB_TO\r\n8;ext=1\r\nKEN rest\r\n0\r\nX-Trailer: t\r\n\r\n"
        var outputs: Set<String> = []
        for chunk in chunkSizes {
            let run = rewrite(input, secrets: [s], chunk: chunk)
            #expect(run.status == .open)
            outputs.insert(run.text)
        }
        #expect(outputs.count == 1)
        // The replacement belongs to the chunk where the placeholder started; the next
        // chunk keeps only what followed it.
        #expect(outputs.first == "POST /u HTTP/1.1\r\nHost: api.example.com\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nreal-token-value\r\n5\r\n rest\r\n0\r\nX-Trailer: t\r\n\r\n")
    }

    @Test func placeholderSplitAcrossTCPReadsInEverySite() {
        let s = secret("TOKEN", value: "V", inject: Injection(headers: true, basicAuth: true, query: true, body: true))
        let input = "POST /a?q=%24MSB_TOKEN HTTP/1.1\r\nHost: api.example.com\r\nX: $MSB_TOKEN\r\nAuthorization: Basic dTokTVNCX1RPS0VO\r\nContent-Length: 12\r\n\r\nb=$MSB_TOKEN"
        let expected = "POST /a?q=V HTTP/1.1\r\nHost: api.example.com\r\nX: V\r\nAuthorization: Basic dTpW\r\nContent-Length: 3\r\n\r\nb=V"
        for chunk in chunkSizes {
            #expect(rewrite(input, secrets: [s], chunk: chunk).text == expected, "chunk \(String(describing: chunk))")
        }
    }

    @Test func wholeTokenOnly() {
        let a = secret("A", value: "VA", placeholder: "$MSB_A")
        let run = rewrite("GET / HTTP/1.1\r\nHost: api.example.com\r\nX: $MSB_AB $MSB_A_ $MSB_A1 $MSB_A-x $MSB_A\r\n\r\n", secrets: [a])
        #expect(run.text == "GET / HTTP/1.1\r\nHost: api.example.com\r\nX: $MSB_AB $MSB_A_ $MSB_A1 VA-x VA\r\n\r\n")
    }

    @Test func wholeTokenAtTheEndOfABodyThatArrivesInPieces() {
        let a = secret("A", value: "VA", inject: Injection(body: true), placeholder: "$MSB_A")
        let input = "POST / HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 14\r\n\r\n$MSB_AB $MSB_A"
        for chunk in chunkSizes {
            #expect(rewrite(input, secrets: [a], chunk: chunk).text.hasSuffix("Content-Length: 10\r\n\r\n$MSB_AB VA"))
        }
    }

    @Test func unknownPlaceholderLookingTokensPassUntouched() {
        let input = "POST /x?y=$MSB_NOT_CONFIGURED HTTP/1.1\r\nHost: api.example.com\r\nX: $MSB_OTHER %24MSB_ELSE \\u0024MSB_X\r\nContent-Length: 12\r\n\r\n$MSB_UNKNOWN"
        let run = rewrite(input)
        #expect(run.text == input)
        #expect(run.events.isEmpty)
    }

    @Test func customPlaceholdersThatDoNotStartWithDollar() {
        let s = secret("K", value: "secret-k", placeholder: "{{KEYHOLE_K}}")
        let run = rewrite("GET / HTTP/1.1\r\nHost: api.example.com\r\nX: {{KEYHOLE_K}}\r\n\r\n", secrets: [s])
        #expect(run.text == "GET / HTTP/1.1\r\nHost: api.example.com\r\nX: secret-k\r\n\r\n")
    }

    @Test func secretsWithDistinctHostsOnOneConnection() {
        let gh = secret("GH", value: "gh-value", hosts: ["api.github.com"])
        let other = secret("OTHER", value: "other-value", hosts: ["api.example.com"])
        let run = rewrite(
            "GET / HTTP/1.1\r\nHost: api.github.com\r\nX: $MSB_GH\r\n\r\n", secrets: [gh, other], identity: .verifiedTLS(sni: "api.github.com"))
        #expect(run.text.contains("X: gh-value"))
    }

    @Test func hostPatternsApply() {
        let s = secret("RAW", value: "raw-value", hosts: [], patterns: ["*.githubusercontent.com"])
        let ok = rewrite(
            "GET / HTTP/1.1\r\nHost: raw.githubusercontent.com\r\nX: $MSB_RAW\r\n\r\n", secrets: [s],
            identity: .verifiedTLS(sni: "raw.githubusercontent.com"))
        #expect(ok.text.contains("X: raw-value"))
        let apex = rewrite(
            "GET / HTTP/1.1\r\nHost: githubusercontent.com\r\nX: $MSB_RAW\r\n\r\n", secrets: [s],
            identity: .verifiedTLS(sni: "githubusercontent.com"))
        #expect(apex.violations.first?.reason == .hostNotAllowed)
    }

    @Test func hostWithPortCaseAndTrailingDotStillMatches() {
        let run = rewrite("GET / HTTP/1.1\r\nhost: API.Example.com.:443\r\nX: $MSB_TOKEN\r\n\r\n")
        #expect(run.text.contains("X: real-token-value"))
    }

    @Test func expectContinueIsAnsweredByKeyholeWhenItHoldsTheBody() {
        let s = secret("TOKEN", value: "V", inject: Injection(body: true))
        let run = rewrite(
            "PUT /f HTTP/1.1\r\nHost: api.example.com\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n$MSB_TOKEN", secrets: [s])
        #expect(run.output.continueToGuest)
        #expect(run.text == "PUT /f HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 1\r\n\r\nV")
    }
}
