import KeyholeEngine
import KeyholePolicy
import Testing

@Suite("Compiled secrets")
struct CompiledSecretTests {
    @Test func percentEncodingKeepsOnlyUnreservedCharacters() {
        let encoded = PercentEncoding.encode(Array("a-b_c.d~e f/g+h=i&j%$".utf8))
        #expect(String(decoding: encoded, as: UTF8.self) == "a-b_c.d~e%20f%2Fg%2Bh%3Di%26j%25%24")
    }

    @Test func compilesPlaceholderAndHosts() {
        let secret = Secret(env: "TOKEN", value: SecretValue("v"), allowedHosts: HostAllowList(exact: ["api.example.com"]))
        let compiled = CompiledSecret(secret)
        #expect(compiled.placeholder == Array("$MSB_TOKEN".utf8))
        #expect(compiled.allowedHosts.allows("api.example.com"))
    }
}
