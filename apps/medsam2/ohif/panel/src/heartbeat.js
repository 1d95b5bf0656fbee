// C6: while a study is open the panel tells the app every 30 s (POST /medsam2/heartbeat {"image": id}), so the
// app keeps that annotator's session; a 429 (the live-session cap) is shown in the panel with its detail.

export const HEARTBEAT_S = 30;

export class Heartbeat {
  /** `beat(image)` sends one heartbeat; `image()` the open series (null: none); `refused(message)` shows why
   * the app refused it. */
  constructor({ beat, image, refused }) {
    this.beat = beat;
    this.image = image;
    this.refused = refused;
    this.timer = null;
    this.unsupported = false; // the app has no heartbeat route: stop asking
  }

  start() {
    this.stop();
    this.send();
    this.timer = setInterval(() => this.send(), HEARTBEAT_S * 1000);
  }

  stop() {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }

  async send() {
    const image = this.image();
    if (!image || this.unsupported) return;
    try {
      await this.beat(image);
    } catch (e) {
      if (e.status === 404 || e.status === 405) this.unsupported = true;
      else if (e.status === 429 || e.status === 401 || e.status === 403) this.refused(e.detail);
    }
  }
}
