/*
 * The reference beside meshd's hot path: OpenSSL's ChaCha20-Poly1305 (libcrypto, the same code
 * `openssl speed` times) used the way WireGuard must use an AEAD, one message per packet.
 *
 * usage: openssl_aead SIZE ITERATIONS
 * Prints two lines, "per-message SIZE MBPS" and "streaming SIZE MBPS", in decimal MB/s of
 * plaintext:
 *   per-message  every packet sealed with its own nonce (init with the nonce, encrypt, final, read
 *                the tag) and opened again (init, set the tag, decrypt, final, which checks it):
 *                the work of one encapsulate + decapsulate, counted once per packet as criterion
 *                counts meshd's
 *   streaming    what `openssl speed -evp chacha20-poly1305` times: encrypt calls on one context,
 *                one endless message, no nonce, no tag
 * Exits 1 if any call fails or a tag does not verify.
 */
#include <openssl/evp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double seconds_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void fail(const char *what)
{
    fprintf(stderr, "openssl_aead: %s failed\n", what);
    exit(1);
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: openssl_aead SIZE ITERATIONS\n");
        return 2;
    }
    int size = atoi(argv[1]);
    long iterations = atol(argv[2]);
    if (size <= 0 || size > 65536 || iterations <= 0) {
        fprintf(stderr, "openssl_aead: SIZE must be 1..65536 and ITERATIONS positive\n");
        return 2;
    }
    unsigned char key[32], nonce[12] = {0}, tag[16];
    unsigned char *buf = malloc((size_t)size);
    if (buf == NULL)
        fail("malloc");
    memset(key, 7, sizeof(key));
    memset(buf, 1, (size_t)size);
    EVP_CIPHER_CTX *seal = EVP_CIPHER_CTX_new(), *open = EVP_CIPHER_CTX_new();
    if (seal == NULL || open == NULL)
        fail("EVP_CIPHER_CTX_new");
    if (!EVP_EncryptInit_ex(seal, EVP_chacha20_poly1305(), NULL, key, nonce)
        || !EVP_DecryptInit_ex(open, EVP_chacha20_poly1305(), NULL, key, nonce))
        fail("init");

    int len;
    double start = seconds_now();
    for (long i = 0; i < iterations; i++) {
        uint64_t counter = (uint64_t)i;
        memcpy(nonce + 4, &counter, sizeof(counter));
        if (!EVP_EncryptInit_ex(seal, NULL, NULL, NULL, nonce)
            || !EVP_EncryptUpdate(seal, buf, &len, buf, size)
            || !EVP_EncryptFinal_ex(seal, buf + len, &len)
            || !EVP_CIPHER_CTX_ctrl(seal, EVP_CTRL_AEAD_GET_TAG, 16, tag))
            fail("seal");
        if (!EVP_DecryptInit_ex(open, NULL, NULL, NULL, nonce)
            || !EVP_CIPHER_CTX_ctrl(open, EVP_CTRL_AEAD_SET_TAG, 16, tag)
            || !EVP_DecryptUpdate(open, buf, &len, buf, size)
            || EVP_DecryptFinal_ex(open, buf + len, &len) <= 0)
            fail("open (tag check)");
    }
    double elapsed = seconds_now() - start;
    printf("per-message %d %.1f\n", size, (double)iterations * size / elapsed / 1e6);

    if (!EVP_EncryptInit_ex(seal, NULL, NULL, NULL, nonce))
        fail("init");
    start = seconds_now();
    for (long i = 0; i < iterations; i++)
        if (!EVP_EncryptUpdate(seal, buf, &len, buf, size))
            fail("encrypt");
    elapsed = seconds_now() - start;
    printf("streaming %d %.1f\n", size, (double)iterations * size / elapsed / 1e6);

    EVP_CIPHER_CTX_free(seal);
    EVP_CIPHER_CTX_free(open);
    free(buf);
    return 0;
}
